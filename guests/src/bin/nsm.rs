//! Proves the NSM from inside: discovery among the virtio-mmio devices, DescribeNSM, the boot
//! PCRs, extend and lock with their errors, GetRandom and an Attestation with the command
//! line's `nonce=` text. Prints each response as `NSM <name> <hex>` for the host test to decode
//! with AWS's nsm-api and to verify.
#![no_std]
#![no_main]

use carve_guests::nsm::{attestation_request, response_bytes, Cbor, Nsm, DEVICE_ID};
use carve_guests::virtio::find_device_of_type;
use carve_guests::{check, exit, guest_main, param, print, println, BootInfo};

guest_main!(main);

const DMA: u64 = 0x0200_0000;

fn show(name: &str, response: &[u8]) {
    print!("NSM {} ", name);
    for byte in response {
        print!("{:02x}", byte);
    }
    println!();
}

fn pcr_request<'a>(buf: &'a mut [u8], variant: &str, index: u64, data: Option<&[u8]>) -> &'a [u8] {
    let mut cbor = Cbor::new(buf);
    cbor.map(1).text(variant).map(if data.is_some() { 2 } else { 1 });
    cbor.text("index").uint(index);
    if let Some(data) = data {
        cbor.text("data").byte_string(data);
    }
    let len = cbor.bytes().len();
    &buf[..len]
}

fn main(boot: &BootInfo) -> ! {
    let Some(device) = find_device_of_type(boot.cmdline, DEVICE_ID) else {
        println!("FAIL: no virtio-nsm device among the virtio_mmio.device= entries");
        exit(1)
    };
    let mut nsm = match Nsm::new(device, DMA) {
        Ok(nsm) => nsm,
        Err(e) => {
            println!("FAIL: nsm init: {}", e);
            exit(1)
        }
    };
    let mut buf = [0u8; 1024];

    let mut cbor = Cbor::new(&mut buf);
    cbor.text("DescribeNSM");
    let len = cbor.bytes().len();
    show("DescribeNSM", nsm.call(&buf[..len]));
    show("DescribePCR0", nsm.call(pcr_request(&mut buf, "DescribePCR", 0, None)));
    show("DescribePCR4", nsm.call(pcr_request(&mut buf, "DescribePCR", 4, None)));

    let extended = nsm.call(pcr_request(&mut buf, "ExtendPCR", 16, Some(b"carve")));
    check!(
        response_bytes(extended, "ExtendPCR", "data").map(|d| d.len()) == Ok(48),
        "ExtendPCR 16 answers 48 bytes"
    );
    show("ExtendPCR16", extended);
    let locked = nsm.call(pcr_request(&mut buf, "LockPCR", 16, None));
    check!(locked == b"\x67LockPCR", "LockPCR 16 answers \"LockPCR\"");
    let again = nsm.call(pcr_request(&mut buf, "ExtendPCR", 16, Some(b"x")));
    check!(
        response_bytes(again, "ExtendPCR", "data") == Err("ReadOnlyIndex"),
        "extending a locked PCR is ReadOnlyIndex"
    );
    let past = nsm.call(pcr_request(&mut buf, "DescribePCR", 32, None));
    check!(response_bytes(past, "DescribePCR", "data") == Err("InvalidIndex"), "PCR 32 is InvalidIndex");
    let garbage = nsm.call(&[0xff, 0x00]);
    check!(response_bytes(garbage, "", "") == Err("InvalidOperation"), "garbage is InvalidOperation");

    let mut cbor = Cbor::new(&mut buf);
    cbor.text("GetRandom");
    let len = cbor.bytes().len();
    let random = nsm.call(&buf[..len]);
    let bytes = response_bytes(random, "GetRandom", "random").unwrap_or(&[]);
    check!(bytes.len() == 256 && bytes.iter().any(|&b| b != 0), "GetRandom gives 256 bytes");

    let nonce = param(boot.cmdline, "nonce").unwrap_or("").as_bytes();
    let len = attestation_request(&mut buf, Some(b"carve-nsm-test"), Some(nonce));
    let response = nsm.call(&buf[..len]);
    check!(response_bytes(response, "Attestation", "document").is_ok(), "Attestation answers a document");
    show("Attestation", response);
    exit(0)
}
