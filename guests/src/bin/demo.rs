//! carve's demo guest: says what it booted with, then powers off cleanly.
#![no_std]
#![no_main]

use carve_guests::{fw_cfg, guest_main, println, BootInfo};

guest_main!(main);

fn main(boot: &BootInfo) -> ! {
    println!("Hello from the carve demo guest!");
    println!("  boot protocol: {}", boot.protocol.name());
    println!("  command line:  {}", boot.cmdline);
    println!("  memory:        {} MiB usable of {} MiB", boot.usable_bytes() >> 20, boot.ram_end() >> 20);
    println!("  vCPUs:         {}", fw_cfg::read_u16(fw_cfg::NB_CPUS));
    for module in boot.modules() {
        println!("  module:        {} bytes at {:#x}", module.size, module.base);
    }
    println!("Demo guest done; powering off.");
    carve_guests::reset()
}
