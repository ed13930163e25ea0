//! What the VMM handed over at boot, read the same way for PVH, multiboot v1 and the Linux
//! 64-bit boot protocol.

use crate::entry::LINUX64_MAGIC;
use crate::io::{phys_cstr, read_phys};

const MULTIBOOT_MAGIC: u32 = 0x2bad_b002;
const PVH_MAGIC: u32 = 0x336e_c578;
const MAX_RANGES: usize = 32;
const MAX_MODULES: usize = 4;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Pvh,
    Multiboot,
    Linux64,
    Unknown,
}

impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Pvh => "pvh",
            Protocol::Multiboot => "multiboot",
            Protocol::Linux64 => "linux64",
            Protocol::Unknown => "unknown",
        }
    }
}

#[derive(Clone, Copy, Debug, Default)]
pub struct MemoryRange {
    pub base: u64,
    pub size: u64,
    /// e820 type: 1 = usable RAM.
    pub kind: u32,
}

#[derive(Clone, Copy, Debug, Default)]
pub struct Module {
    pub base: u64,
    pub size: u64,
}

impl Module {
    pub fn bytes(&self) -> &'static [u8] {
        crate::io::phys_slice(self.base, self.size as usize)
    }
}

pub struct BootInfo {
    pub protocol: Protocol,
    pub cmdline: &'static str,
    ranges: [MemoryRange; MAX_RANGES],
    range_count: usize,
    modules: [Module; MAX_MODULES],
    module_count: usize,
    /// Multiboot: the lower/upper memory sizes in KiB.
    pub mem_lower_upper_kib: Option<(u32, u32)>,
}

impl BootInfo {
    pub fn parse(magic: u32, info: u64) -> BootInfo {
        let mut boot = BootInfo {
            protocol: Protocol::Unknown,
            cmdline: "",
            ranges: [MemoryRange::default(); MAX_RANGES],
            range_count: 0,
            modules: [Module::default(); MAX_MODULES],
            module_count: 0,
            mem_lower_upper_kib: None,
        };
        if magic == MULTIBOOT_MAGIC {
            boot.parse_multiboot(info);
        } else if magic == LINUX64_MAGIC {
            boot.parse_linux(info);
        } else if read_phys::<u32>(info) == PVH_MAGIC {
            boot.parse_pvh(info);
        }
        boot
    }

    pub fn memory_map(&self) -> &[MemoryRange] {
        &self.ranges[..self.range_count]
    }

    pub fn modules(&self) -> &[Module] {
        &self.modules[..self.module_count]
    }

    /// The end of the highest usable RAM range.
    pub fn ram_end(&self) -> u64 {
        self.memory_map().iter().filter(|r| r.kind == 1).map(|r| r.base + r.size).max().unwrap_or(0)
    }

    pub fn usable_bytes(&self) -> u64 {
        self.memory_map().iter().filter(|r| r.kind == 1).map(|r| r.size).sum()
    }

    fn push_range(&mut self, base: u64, size: u64, kind: u32) {
        if self.range_count < MAX_RANGES {
            self.ranges[self.range_count] = MemoryRange { base, size, kind };
            self.range_count += 1;
        }
    }

    fn push_module(&mut self, base: u64, size: u64) {
        if self.module_count < MAX_MODULES {
            self.modules[self.module_count] = Module { base, size };
            self.module_count += 1;
        }
    }

    /// hvm_start_info: magic, version, flags, nr_modules, modlist, cmdline, rsdp, memmap.
    fn parse_pvh(&mut self, info: u64) {
        self.protocol = Protocol::Pvh;
        let nr_modules = read_phys::<u32>(info + 12);
        let modlist = read_phys::<u64>(info + 16);
        self.cmdline = phys_cstr(read_phys::<u64>(info + 24));
        let memmap = read_phys::<u64>(info + 40);
        let entries = read_phys::<u32>(info + 48);
        for i in 0..entries as u64 {
            let entry = memmap + i * 24;
            self.push_range(read_phys(entry), read_phys(entry + 8), read_phys(entry + 16));
        }
        for i in 0..nr_modules as u64 {
            let entry = modlist + i * 32;
            self.push_module(read_phys(entry), read_phys(entry + 8));
        }
    }

    /// multiboot_info: flags, mem_lower, mem_upper, boot_device, cmdline, mods, syms, mmap.
    fn parse_multiboot(&mut self, info: u64) {
        self.protocol = Protocol::Multiboot;
        let flags = read_phys::<u32>(info);
        if flags & 1 != 0 {
            self.mem_lower_upper_kib = Some((read_phys(info + 4), read_phys(info + 8)));
        }
        if flags & (1 << 2) != 0 {
            self.cmdline = phys_cstr(read_phys::<u32>(info + 16) as u64);
        }
        if flags & (1 << 3) != 0 {
            let count = read_phys::<u32>(info + 20);
            let mods = read_phys::<u32>(info + 24) as u64;
            for i in 0..count as u64 {
                let start = read_phys::<u32>(mods + i * 16) as u64;
                let end = read_phys::<u32>(mods + i * 16 + 4) as u64;
                self.push_module(start, end.saturating_sub(start));
            }
        }
        if flags & (1 << 6) != 0 {
            let length = read_phys::<u32>(info + 44) as u64;
            let mut entry = read_phys::<u32>(info + 48) as u64;
            let end = entry + length;
            while entry < end {
                let size = read_phys::<u32>(entry) as u64;
                self.push_range(read_phys(entry + 4), read_phys(entry + 12), read_phys(entry + 20));
                entry += size + 4;
            }
        }
    }

    /// boot_params ("zero page"): e820 table, setup header's cmdline and ramdisk fields.
    fn parse_linux(&mut self, zero_page: u64) {
        self.protocol = Protocol::Linux64;
        let cmdline =
            read_phys::<u32>(zero_page + 0x228) as u64 | (read_phys::<u32>(zero_page + 0x0c8) as u64) << 32;
        self.cmdline = phys_cstr(cmdline);
        let entries = read_phys::<u8>(zero_page + 0x1e8);
        for i in 0..entries as u64 {
            let entry = zero_page + 0x2d0 + i * 20;
            self.push_range(read_phys(entry), read_phys(entry + 8), read_phys(entry + 16));
        }
        let image =
            read_phys::<u32>(zero_page + 0x218) as u64 | (read_phys::<u32>(zero_page + 0x0c0) as u64) << 32;
        let size =
            read_phys::<u32>(zero_page + 0x21c) as u64 | (read_phys::<u32>(zero_page + 0x0c4) as u64) << 32;
        if size != 0 {
            self.push_module(image, size);
        }
    }
}
