//! Any bytes as what a migration destination reads from the network: the preamble, then frames
//! until the VM's state, each checked as `carve vm run --incoming` checks it (offers decoded and
//! their layout validated, pages against that layout, the state decoded and validated). Frames
//! are also fed with their checksums made right, as libFuzzer rarely forges a CRC. An error,
//! never a panic.
#![no_main]

use carve_vmm::memory::{ram_regions, RamRange};
use carve_vmm::migration::protocol::{self, Kind, Offer};
use carve_vmm::snapshot::VmSnapshot;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    read_stream(data);
    // The same bytes split into frames whose headers are right: the first byte picks the kind.
    let mut stream = protocol::preamble().to_vec();
    for chunk in data.chunks(4099) {
        let Some((&kind, payload)) = chunk.split_first() else { continue };
        let kind = [Kind::Offer, Kind::Pages, Kind::State, Kind::Abort][usize::from(kind % 4)];
        protocol::write_frame(&mut stream, kind, payload).expect("a Vec takes any frame");
    }
    read_stream(&stream);
});

fn read_stream(mut reader: &[u8]) {
    if protocol::read_preamble(&mut reader).is_err() {
        return;
    }
    let mut layout: Vec<RamRange> = ram_regions(16 << 20);
    while let Ok((kind, payload)) = protocol::read_frame(&mut reader) {
        match kind {
            Kind::Offer => {
                if let Ok(offer) = carve_snapshot::file::decode::<Offer>(&payload) {
                    layout = offer.memory;
                }
            }
            Kind::Pages => {
                let _ = protocol::parse_pages(&payload, &layout, |gpa, data| {
                    assert!(layout.iter().any(|r| gpa >= r.base && gpa < r.end()));
                    assert!(data.is_none_or(|d| d.len() == protocol::PAGE_SIZE));
                });
            }
            Kind::State => {
                if let Ok(state) = carve_snapshot::file::decode::<VmSnapshot>(&payload) {
                    let _ = state.validate();
                }
            }
            _ => {}
        }
    }
}
