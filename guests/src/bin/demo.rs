//! carve's demo guest: says what it booted with; with a vsock device it serves echo on port 5005
//! (`echo_sessions=N` on the command line stops it after N sessions), then powers off cleanly.
#![no_std]
#![no_main]

use carve_guests::virtio::{find_device, MmioDevice};
use carve_guests::vsock::{serve_echo, Vsock};
use carve_guests::{fw_cfg, guest_main, param, parse_u64, println, BootInfo};

guest_main!(main);

const DMA: u64 = 0x0200_0000;
const ECHO_PORT: u32 = 5005;

fn main(boot: &BootInfo) -> ! {
    println!("Hello from the carve demo guest!");
    println!("  boot protocol: {}", boot.protocol.name());
    println!("  command line:  {}", boot.cmdline);
    println!("  memory:        {} MiB usable of {} MiB", boot.usable_bytes() >> 20, boot.ram_end() >> 20);
    println!("  vCPUs:         {}", fw_cfg::read_u16(fw_cfg::NB_CPUS));
    for module in boot.modules() {
        println!("  module:        {} bytes at {:#x}", module.size, module.base);
    }
    if let Some((base, _)) = find_device(boot.cmdline) {
        match Vsock::new(MmioDevice { base }, DMA) {
            Ok(mut vsock) => {
                let limit = param(boot.cmdline, "echo_sessions").and_then(parse_u64).map(|n| n as u32);
                println!("  vsock:         CID {}, echo on port {}", vsock.cid, ECHO_PORT);
                vsock.listen(ECHO_PORT);
                let served = serve_echo(&mut vsock, limit, |_, _| false);
                println!("  served {} echo sessions", served);
            }
            Err(e) => println!("  vsock:         unusable: {}", e),
        }
    }
    println!("Demo guest done; powering off.");
    carve_guests::reset()
}
