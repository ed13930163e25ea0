//! Proves several vCPUs come up: the MP table lists them, fw_cfg counts them, and INIT/SIPI
//! brings each application processor into 64-bit Rust code.
#![no_std]
#![no_main]

use carve_guests::{check, exit, fw_cfg, guest_main, param, parse_u64, println, smp, BootInfo};

guest_main!(main);

fn main(boot: &BootInfo) -> ! {
    let expected = param(boot.cmdline, "expect_cpus").and_then(parse_u64).unwrap_or(1) as u32;
    let table = smp::find_mp_table();
    check!(table.is_some(), "MP table found and checksums valid");
    let table = table.unwrap();
    println!(
        "MP table: {} CPUs, {} IOAPICs, {} interrupt sources",
        table.cpus, table.ioapics, table.interrupt_sources
    );
    check!(table.cpus == expected, "MP table lists {} CPUs", expected);
    check!(table.bsp_apic_id == Some(0), "BSP has APIC ID 0");
    check!(table.ioapics == 1, "one IOAPIC");
    check!(table.interrupt_sources >= 16, "ISA interrupts routed");
    check!(fw_cfg::read_u16(fw_cfg::NB_CPUS) as u32 == expected, "fw_cfg reports {} CPUs", expected);
    if expected > 1 {
        let started = smp::start_aps(expected - 1);
        check!(started == expected - 1, "{} application processors started", started);
    }
    exit(0)
}
