//! Any bytes as what a migration destination reads from the network, through the destination's
//! own code: the preamble, an offer (decoded and checked as `carve vm run --incoming` checks it
//! before it accepts), then `receive_memory` writing pages into a small guest until the VM's
//! state, which is validated as a restore would. The same bytes are also cut into frames whose
//! headers and checksums are right, as libFuzzer rarely forges a CRC. An error, never a panic.
#![no_main]

use carve_vmm::memory::{self, MemoryBacking};
use carve_vmm::migration::destination::receive_memory;
use carve_vmm::migration::protocol::{self, Kind, Offer};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    read_stream(data);
    let mut stream = protocol::preamble().to_vec();
    for chunk in data.chunks(4099) {
        let Some((&kind, payload)) = chunk.split_first() else { continue };
        let kind = [Kind::Offer, Kind::Pages, Kind::State, Kind::Abort][usize::from(kind % 4)];
        protocol::write_frame(&mut stream, kind, payload).expect("a Vec takes any small frame");
    }
    read_stream(&stream);
});

fn read_stream(mut reader: &[u8]) {
    if protocol::read_preamble(&mut reader).is_err() {
        return;
    }
    // The offer is checked; a 16 MiB guest stands for any it describes (pages outside it are
    // refused by the same layout check as pages outside a bigger one).
    match protocol::read_frame(&mut reader) {
        Ok((Kind::Offer, payload)) => {
            if let Ok(offer) = carve_snapshot::file::decode::<Offer>(&payload) {
                let _ = offer.check();
            }
        }
        _ => return,
    }
    let mem = memory::create(16, MemoryBacking::Anonymous).expect("16 MiB maps");
    if let Ok(state) = receive_memory(&mut reader, &mem, &memory::layout(&mem)) {
        let _ = state.validate();
    }
}
