//! Proves MSI routing through a device-owned message store (run with `--testdev`): a message
//! reaches this vCPU at its vector through KVM's irqfd; masking latches it as pending and
//! unmasking delivers it; vectors past PCI MSI-X's 2048 work; re-targeting an unmasked vector
//! takes effect; and filling KVM's route table ends in a clean "exhausted" status, after which
//! everything routed still works.
#![no_std]
#![no_main]

use carve_guests::interrupts::{self, wait_for, FIRST_VECTOR};
use carve_guests::io::{read_phys, write_phys};
use carve_guests::{check, exit, guest_main, BootInfo};

guest_main!(main);

const DEVICE: u64 = 0xd100_0000;
const DOORBELL: u64 = DEVICE;
const STATUS: u64 = DEVICE + 4;
const CAPACITY: u64 = DEVICE + 8;
const SPINS: u32 = 200_000;

fn entry(index: u32) -> u64 {
    DEVICE + 0x1000 + 16 * index as u64
}

fn program(index: u32, vector: u8) {
    write_phys::<u32>(entry(index), 0xfee0_0000); // destination APIC ID 0, physical mode
    write_phys::<u32>(entry(index) + 4, 0);
    write_phys::<u32>(entry(index) + 8, vector as u32); // fixed delivery, edge
}

fn set_masked(index: u32, masked: bool) {
    write_phys::<u32>(entry(index) + 12, masked as u32);
}

fn control(index: u32) -> u32 {
    read_phys(entry(index) + 12)
}

fn status() -> u32 {
    read_phys(STATUS)
}

fn main(_boot: &BootInfo) -> ! {
    let capacity: u32 = read_phys(CAPACITY);
    check!(capacity > 2048, "the VM can route {} MSI vectors, more than PCI MSI-X's 2048", capacity);
    interrupts::enable();

    program(0, FIRST_VECTOR);
    check!(control(0) & 1 == 1, "vectors start masked");
    set_masked(0, false);
    check!(status() == 0, "unmasking allocated a route");
    write_phys::<u32>(DOORBELL, 0);
    check!(wait_for(0, 0, SPINS) == 1, "the MSI arrived at vector {:#x}", FIRST_VECTOR);

    set_masked(0, true);
    write_phys::<u32>(DOORBELL, 0);
    check!(wait_for(0, 1, 20_000) == 1, "a masked vector does not fire");
    check!(control(0) & 2 == 2, "its trigger is pending");
    set_masked(0, false);
    check!(wait_for(0, 1, SPINS) == 2, "unmasking delivers the pending MSI");
    check!(control(0) & 2 == 0, "and clears pending");

    program(3000, FIRST_VECTOR + 1);
    set_masked(3000, false);
    write_phys::<u32>(DOORBELL, 3000);
    check!(
        wait_for(1, 0, SPINS) == 1,
        "vector 3000 of the store (past 2048) fires at {:#x}",
        FIRST_VECTOR + 1
    );

    program(0, FIRST_VECTOR + 2);
    write_phys::<u32>(DOORBELL, 0);
    check!(wait_for(2, 0, SPINS) == 1, "re-targeting an unmasked vector takes effect");

    // Fill KVM's table: every other vector gets a route until none is left.
    let mut routed = 2;
    for index in 1..4096u32 {
        if index == 3000 {
            continue;
        }
        write_phys::<u32>(entry(index) + 8, (FIRST_VECTOR + 3) as u32);
        set_masked(index, false);
        if status() != 0 {
            break;
        }
        routed += 1;
    }
    check!(routed == capacity, "{} vectors routed before the table was full", routed);
    check!(status() == 1, "the next one reports the route table exhausted");
    write_phys::<u32>(DOORBELL, 3000);
    check!(wait_for(1, 1, SPINS) == 2, "routes made before still deliver");
    exit(0)
}
