//! Interrupt sources devices own, routed through KVM: legacy lines (IOAPIC pins) and MSI
//! messages kept in a per-device message store (the "interrupt message store" model: no
//! per-device vector cap; KVM's route limit is the only ceiling).
//!
//! Every source is an eventfd bound to a GSI with KVM_IRQFD, so a device (or another thread it
//! hands the notifier to) raises it without an ioctl. MSI vectors get their GSI on first unmask;
//! masking takes the route and irqfd away and latches triggers as pending, which unmasking
//! delivers.
//!
//! KVM_SET_GSI_ROUTING replaces the whole table and waits for an SRCU grace period, so a guest
//! programming thousands of vectors would pay that thousands of times. Route changes therefore
//! reach KVM when a vector next fires: every MSI trigger goes through [`MsiStore::trigger`],
//! which commits a changed table and binds the vector's irqfd first. Until then a vector has no
//! irqfd, so KVM's stale copy of its route cannot be used.

pub mod routes;

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use kvm_bindings::KvmIrqRouting;
use kvm_ioctls::{Cap, VmFd};
use vmm_sys_util::eventfd::EventFd;

use routes::{RouteTable, IOAPIC_PINS};

#[derive(Debug, thiserror::Error)]
pub enum InterruptError {
    #[error(
        "KVM's interrupt routing table is full: it holds {limit} routes and {msi} MSI vectors \
         already use every one the IOAPIC pins leave"
    )]
    RoutesExhausted { limit: usize, msi: usize },
    #[error("IRQ {0} is not an IOAPIC pin (0–23)")]
    NoSuchPin(u32),
    #[error("cannot create an interrupt eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("KVM refused to {what}: {source}")]
    Kvm { what: &'static str, source: kvm_ioctls::Error },
}

/// An x86 MSI: the address (0xFEEx_xxxx with the destination) and data (vector, mode) a device
/// writes to signal it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MsiMessage {
    pub address: u64,
    pub data: u32,
}

/// Owns the VM's routing table; cheap to clone and share with devices.
#[derive(Clone)]
pub struct InterruptManager {
    vm: Arc<VmFd>,
    table: Arc<Mutex<RouteTable>>,
}

impl InterruptManager {
    /// Takes over the VM's routing (after KVM_CREATE_IRQCHIP) and pushes the default table.
    pub fn new(vm: Arc<VmFd>) -> Result<InterruptManager, InterruptError> {
        let limit = vm.check_extension_int(Cap::IrqRouting).max(0) as usize;
        let manager = InterruptManager { vm, table: Arc::new(Mutex::new(RouteTable::new(limit))) };
        manager.flush()?;
        Ok(manager)
    }

    /// A legacy line on IOAPIC pin `pin` (which KVM's default routes also feed to the PIC).
    pub fn legacy_line(&self, pin: u32) -> Result<LegacyLine, InterruptError> {
        if pin >= IOAPIC_PINS {
            return Err(InterruptError::NoSuchPin(pin));
        }
        let event = EventFd::new(libc::EFD_NONBLOCK).map_err(InterruptError::EventFd)?;
        self.vm.register_irqfd(&event, pin).map_err(kvm("bind an irqfd to an IOAPIC pin"))?;
        Ok(LegacyLine { pin, event })
    }

    /// An empty message store for one device.
    pub fn msi_store(&self) -> MsiStore {
        MsiStore { manager: self.clone(), vectors: Vec::new() }
    }

    /// MSI vectors the VM can route in all (KVM's limit minus the irqchip's routes).
    pub fn msi_capacity(&self) -> usize {
        self.table().msi_capacity()
    }

    fn table(&self) -> MutexGuard<'_, RouteTable> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn commit(&self, table: &mut RouteTable) -> Result<(), InterruptError> {
        let routing = KvmIrqRouting::from_entries(&table.entries()).map_err(|_| {
            InterruptError::RoutesExhausted { limit: table.limit(), msi: table.msi_allocated() }
        })?;
        self.vm.set_gsi_routing(&routing).map_err(kvm("set the GSI routing table"))?;
        table.committed();
        Ok(())
    }

    /// Brings KVM's table up to date when routes changed since the last commit.
    fn flush(&self) -> Result<(), InterruptError> {
        let mut table = self.table();
        if table.changed() {
            self.commit(&mut table)?;
        }
        Ok(())
    }
}

fn kvm(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> InterruptError {
    move |source| InterruptError::Kvm { what, source }
}

/// An IOAPIC pin a device raises by writing its eventfd.
pub struct LegacyLine {
    pin: u32,
    event: EventFd,
}

impl LegacyLine {
    pub fn pin(&self) -> u32 {
        self.pin
    }

    pub fn trigger(&self) -> std::io::Result<()> {
        self.event.write(1)
    }

    /// The eventfd itself, for code that signals from another thread.
    pub fn notifier(&self) -> &EventFd {
        &self.event
    }
}

impl vm_superio::Trigger for LegacyLine {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        LegacyLine::trigger(self)
    }
}

impl carve_virtio::InterruptLine for LegacyLine {
    fn trigger(&self) {
        // A full eventfd counter already means "pending"; nothing is lost by ignoring EAGAIN.
        let _ = LegacyLine::trigger(self);
    }
}

/// One MSI vector of a message store.
struct Vector {
    message: MsiMessage,
    masked: bool,
    pending: bool,
    /// GSI and eventfd, from the first unmask on.
    route: Option<Route>,
}

struct Route {
    gsi: u32,
    event: EventFd,
    /// Whether the eventfd is KVM's irqfd for `gsi` (from the first trigger after an unmask).
    bound: bool,
}

impl Default for Vector {
    fn default() -> Vector {
        // Vectors start masked, as MSI-X table entries do.
        Vector { message: MsiMessage::default(), masked: true, pending: false, route: None }
    }
}

/// A device's own interrupt message store: as many vectors as the device asks for, each with
/// its message, mask and pending bit.
pub struct MsiStore {
    manager: InterruptManager,
    vectors: Vec<Vector>,
}

impl MsiStore {
    /// Vectors the store holds (it grows when a higher index is written).
    pub fn len(&self) -> usize {
        self.vectors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.vectors.is_empty()
    }

    fn vector(&mut self, index: usize) -> &mut Vector {
        if index >= self.vectors.len() {
            self.vectors.resize_with(index + 1, Vector::default);
        }
        &mut self.vectors[index]
    }

    pub fn message(&self, index: usize) -> MsiMessage {
        self.vectors.get(index).map(|v| v.message).unwrap_or_default()
    }

    pub fn is_masked(&self, index: usize) -> bool {
        self.vectors.get(index).is_none_or(|v| v.masked)
    }

    pub fn is_pending(&self, index: usize) -> bool {
        self.vectors.get(index).is_some_and(|v| v.pending)
    }

    /// The GSI KVM routes this vector through, once it has one.
    pub fn gsi(&self, index: usize) -> Option<u32> {
        self.vectors.get(index).and_then(|v| v.route.as_ref().map(|r| r.gsi))
    }

    /// Sets the message; an unmasked vector fires with it from its next trigger on.
    pub fn set_message(&mut self, index: usize, message: MsiMessage) -> Result<(), InterruptError> {
        let manager = self.manager.clone();
        let vector = self.vector(index);
        vector.message = message;
        if let (false, Some(route)) = (vector.masked, &vector.route) {
            manager.table().route(route.gsi, Some(message));
        }
        Ok(())
    }

    /// Masks the vector: its route and irqfd go, and triggers latch as pending.
    pub fn mask(&mut self, index: usize) -> Result<(), InterruptError> {
        let manager = self.manager.clone();
        let vector = self.vector(index);
        if vector.masked {
            return Ok(());
        }
        vector.masked = true;
        if let Some(route) = &mut vector.route {
            if route.bound {
                manager.vm.unregister_irqfd(&route.event, route.gsi).map_err(kvm("unbind an MSI irqfd"))?;
                route.bound = false;
                // Anything the device signalled just before is now pending, not lost.
                if route.event.read().is_ok() {
                    vector.pending = true;
                }
            }
            manager.table().route(route.gsi, None);
        }
        Ok(())
    }

    /// Unmasks the vector, allocating its GSI on first use, and delivers a pending trigger (also
    /// one an unmasked vector kept because KVM refused it before).
    pub fn unmask(&mut self, index: usize) -> Result<(), InterruptError> {
        let manager = self.manager.clone();
        let vector = self.vector(index);
        if !vector.masked {
            return if vector.pending { self.trigger(index) } else { Ok(()) };
        }
        if vector.route.is_none() {
            let event = EventFd::new(libc::EFD_NONBLOCK).map_err(InterruptError::EventFd)?;
            let gsi = manager.table().allocate()?;
            vector.route = Some(Route { gsi, event, bound: false });
        }
        if let Some(route) = &vector.route {
            manager.table().route(route.gsi, Some(vector.message));
        }
        vector.masked = false;
        if std::mem::take(&mut vector.pending) {
            self.trigger(index)?;
        }
        Ok(())
    }

    /// Signals the vector: delivered now when unmasked (KVM's table and the irqfd brought up to
    /// date first), else latched as pending.
    pub fn trigger(&mut self, index: usize) -> Result<(), InterruptError> {
        let manager = self.manager.clone();
        let vector = self.vector(index);
        let Some(route) = vector.route.as_mut().filter(|_| !vector.masked) else {
            vector.pending = true;
            return Ok(());
        };
        let bound = manager.flush().and_then(|()| {
            if !route.bound {
                manager.vm.register_irqfd(&route.event, route.gsi).map_err(kvm("bind an MSI irqfd"))?;
                route.bound = true;
            }
            Ok(())
        });
        if let Err(e) = bound {
            // Kept for the next trigger or unmask, which try again.
            vector.pending = true;
            return Err(e);
        }
        route.event.write(1).map_err(InterruptError::EventFd)?;
        vector.pending = false;
        Ok(())
    }
}

impl Drop for MsiStore {
    fn drop(&mut self) {
        let mut table = self.manager.table();
        for route in self.vectors.iter().filter_map(|v| v.route.as_ref()) {
            if route.bound {
                let _ = self.manager.vm.unregister_irqfd(&route.event, route.gsi);
            }
            table.release(route.gsi);
        }
        if table.changed() {
            let _ = self.manager.commit(&mut table);
        }
    }
}
