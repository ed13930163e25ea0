//! A minimal virtio-mmio driver: device discovery from `virtio_mmio.device=` on the command
//! line, the status/feature handshake, and split virtqueues whose buffers are fixed slots in a
//! DMA area (all memory is identity mapped, so addresses are physical).
//!
//! Each descriptor owns one buffer slot of `slot_size` bytes at `buffers + id * slot_size`; a
//! packet is a single descriptor (`push`) or a chain of them (`push_chain`).

use crate::io::{read_phys, write_phys};

const MAGIC: u32 = 0x7472_6976;
const STATUS_ACKNOWLEDGE: u32 = 1;
const STATUS_DRIVER: u32 = 2;
const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FEATURES_OK: u32 = 8;
pub const STATUS_NEEDS_RESET: u32 = 0x40;
const VIRTQ_DESC_F_WRITE: u16 = 2;
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Finds the first `virtio_mmio.device=<size>@<base>:<irq>` on the command line; returns base
/// and IRQ.
pub fn find_device(cmdline: &str) -> Option<(u64, u32)> {
    devices(cmdline).next()
}

/// Every `virtio_mmio.device=` on the command line, in order: (base, IRQ).
pub fn devices(cmdline: &str) -> impl Iterator<Item = (u64, u32)> + '_ {
    cmdline.split_ascii_whitespace().filter_map(|word| {
        let spec = word.strip_prefix("virtio_mmio.device=")?;
        let (_, rest) = spec.split_once('@')?;
        let (base, irq) = rest.split_once(':')?;
        Some((crate::parse_u64(base)?, crate::parse_u64(irq)? as u32))
    })
}

/// The announced device whose ID register reads `device_id`.
pub fn find_device_of_type(cmdline: &str, device_id: u32) -> Option<MmioDevice> {
    devices(cmdline)
        .map(|(base, irq)| MmioDevice { base, irq })
        .find(|d| d.read(0x000) == MAGIC && d.read(0x008) == device_id)
}

#[derive(Clone, Copy)]
pub struct MmioDevice {
    pub base: u64,
    /// Its interrupt line (an IOAPIC pin).
    pub irq: u32,
}

impl MmioDevice {
    pub fn read(&self, offset: u64) -> u32 {
        read_phys(self.base + offset)
    }

    pub fn write(&self, offset: u64, value: u32) {
        write_phys(self.base + offset, value)
    }

    /// Resets the device and negotiates `features` (VERSION_1 is required); Err tells why not.
    pub fn init(&self, device_id: u32, features: u64) -> Result<(), &'static str> {
        if self.read(0x000) != MAGIC || self.read(0x004) != 2 {
            return Err("no virtio-mmio v2 device there");
        }
        if self.read(0x008) != device_id {
            return Err("unexpected device ID");
        }
        self.write(0x070, 0);
        self.write(0x070, STATUS_ACKNOWLEDGE);
        self.write(0x070, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        self.write(0x014, 1);
        let offered = (self.read(0x010) as u64) << 32;
        self.write(0x014, 0);
        let offered = offered | self.read(0x010) as u64;
        if offered & features != features {
            return Err("device lacks a required feature");
        }
        self.write(0x024, 0);
        self.write(0x020, features as u32);
        self.write(0x024, 1);
        self.write(0x020, (features >> 32) as u32);
        let status = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
        self.write(0x070, status);
        if self.read(0x070) & STATUS_FEATURES_OK == 0 {
            return Err("device refused FEATURES_OK");
        }
        Ok(())
    }

    pub fn driver_ok(&self) {
        let status = self.read(0x070);
        self.write(0x070, status | STATUS_DRIVER_OK);
    }

    pub fn status(&self) -> u32 {
        self.read(0x070)
    }

    pub fn notify(&self, queue: u16) {
        self.write(0x050, queue as u32);
    }

    pub fn ack_interrupts(&self) {
        let pending = self.read(0x060);
        self.write(0x064, pending);
    }
}

/// A split virtqueue laid out in one contiguous DMA area:
/// descriptors, available ring, used ring (4 KiB aligned), then the buffer slots.
pub struct Virtqueue {
    pub index: u16,
    pub size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    buffers: u64,
    pub slot_size: u32,
    avail_idx: u16,
    last_used: u16,
    /// Free descriptor ids, as a stack.
    free: [u16; 256],
    free_len: usize,
}

impl Virtqueue {
    /// Bytes a queue of `size` slots of `slot_size` takes at its base.
    pub fn footprint(size: u16, slot_size: u32) -> u64 {
        Self::buffers_offset(size) + size as u64 * slot_size as u64
    }

    fn buffers_offset(size: u16) -> u64 {
        let rings = 16 * size as u64 + 6 + 2 * size as u64;
        (rings + 0xfff) / 0x1000 * 0x1000 + (6 + 8 * size as u64 + 0xfff) / 0x1000 * 0x1000
    }

    /// Lays the queue out at `base` and tells the device about it.
    pub fn new(device: &MmioDevice, index: u16, size: u16, slot_size: u32, base: u64) -> Virtqueue {
        assert!(size as usize <= 256 && size.is_power_of_two());
        let desc = base;
        let avail = base + 16 * size as u64;
        let used = (avail + 6 + 2 * size as u64 + 0xfff) & !0xfff;
        let buffers = base + Self::buffers_offset(size);
        // Zero the rings.
        let mut at = base;
        while at < buffers {
            write_phys::<u64>(at, 0);
            at += 8;
        }
        device.write(0x030, index as u32);
        assert!(device.read(0x034) >= size as u32, "queue too large for the device");
        device.write(0x038, size as u32);
        device.write(0x080, desc as u32);
        device.write(0x084, (desc >> 32) as u32);
        device.write(0x090, avail as u32);
        device.write(0x094, (avail >> 32) as u32);
        device.write(0x0a0, used as u32);
        device.write(0x0a4, (used >> 32) as u32);
        device.write(0x044, 1);
        let mut queue = Virtqueue {
            index,
            size,
            desc,
            avail,
            used,
            buffers,
            slot_size,
            avail_idx: 0,
            last_used: 0,
            free: [0; 256],
            free_len: 0,
        };
        for id in (0..size).rev() {
            queue.free[queue.free_len] = id;
            queue.free_len += 1;
        }
        queue
    }

    /// Address of descriptor `id`'s buffer slot.
    pub fn slot(&self, id: u16) -> u64 {
        self.buffers + id as u64 * self.slot_size as u64
    }

    pub fn has_free(&self) -> bool {
        self.free_len > 0
    }

    /// Takes a free descriptor (its slot is the caller's to fill).
    pub fn take(&mut self) -> Option<u16> {
        if self.free_len == 0 {
            return None;
        }
        self.free_len -= 1;
        Some(self.free[self.free_len])
    }

    pub fn give_back(&mut self, id: u16) {
        self.free[self.free_len] = id;
        self.free_len += 1;
    }

    /// Makes descriptor `id` (its slot, `len` bytes) available to the device.
    pub fn push(&mut self, id: u16, len: u32, device_writes: bool) {
        self.push_chain(&[(id, len, device_writes)]);
    }

    /// Makes a chain of descriptors available, each with its own slot: `(id, len, device_writes)`.
    pub fn push_chain(&mut self, parts: &[(u16, u32, bool)]) {
        for (i, &(id, len, device_writes)) in parts.iter().enumerate() {
            let desc = self.desc + 16 * id as u64;
            let next = parts.get(i + 1).map(|p| p.0);
            let flags =
                if device_writes { VIRTQ_DESC_F_WRITE } else { 0 } | if next.is_some() { 1 } else { 0 };
            write_phys::<u64>(desc, self.slot(id));
            write_phys::<u32>(desc + 8, len);
            write_phys::<u16>(desc + 12, flags);
            write_phys::<u16>(desc + 14, next.unwrap_or(0));
        }
        let ring_slot = self.avail + 4 + 2 * (self.avail_idx % self.size) as u64;
        write_phys::<u16>(ring_slot, parts[0].0);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        core::sync::atomic::fence(core::sync::atomic::Ordering::SeqCst);
        write_phys::<u16>(self.avail + 2, self.avail_idx);
    }

    /// The next buffer the device has finished with: its descriptor id and written length.
    pub fn pop_used(&mut self) -> Option<(u16, u32)> {
        let used_idx: u16 = read_phys(self.used + 2);
        if used_idx == self.last_used {
            return None;
        }
        core::sync::atomic::fence(core::sync::atomic::Ordering::SeqCst);
        let elem = self.used + 4 + 8 * (self.last_used % self.size) as u64;
        let id: u32 = read_phys(elem);
        let len: u32 = read_phys(elem + 4);
        self.last_used = self.last_used.wrapping_add(1);
        Some((id as u16, len))
    }
}
