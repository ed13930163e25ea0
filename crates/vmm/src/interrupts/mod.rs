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
//!
//! The manager keeps every store's vectors next to the route table, under one lock, so a
//! snapshot ([`InterruptState`]) sees all of them at one instant. Restoring rebuilds the stores
//! on a new VM, allocates a GSI again for every vector that held one (the numbers may differ:
//! the guest never sees them), routes every unmasked vector and commits the table; each device
//! then claims its store by id ([`InterruptManager::claim_msi_store`]). Legacy lines have no
//! state of their own: KVM's irqfd takes each write as an edge on the pin at once, and the pins'
//! levels and the IOAPIC's redirection entries are KVM's irqchip state (KVM_GET_IRQCHIP); a
//! restored device asks for its line again.

pub mod routes;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use carve_snapshot::Persist;
use kvm_bindings::KvmIrqRouting;
use kvm_ioctls::{Cap, VmFd};
use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use routes::{RouteTable, IOAPIC_PINS, LEGACY_ROUTES};

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

/// Why an [`InterruptState`] cannot be restored, or a device cannot have its store back.
#[derive(Debug, thiserror::Error)]
pub enum InterruptStateError {
    #[error(
        "the interrupt state's routing table holds {limit} routes, fewer than the \
         {LEGACY_ROUTES} KVM's irqchip takes"
    )]
    RouteLimitBelowIrqchip { limit: u64 },
    #[error(
        "the interrupt state's routing table holds {limit} routes; this host's KVM allows at most {host}"
    )]
    RouteLimitAboveHost { limit: u64, host: usize },
    #[error(
        "the interrupt state's MSI vectors hold {gsis} GSIs; a table of {limit} routes has room \
         for {capacity}"
    )]
    TooManyGsis { gsis: usize, limit: usize, capacity: usize },
    #[error("the interrupt state lists MSI store {0} twice")]
    DuplicateStore(u32),
    #[error(
        "vector {index} of MSI store {store} is unmasked without a GSI, which unmasking always allocates"
    )]
    UnmaskedWithoutGsi { store: u32, index: usize },
    #[error("the restored interrupt state has no MSI store {0}")]
    UnknownStore(u32),
    #[error("MSI store {0} already belongs to a device")]
    StoreClaimed(u32),
    #[error("MSI store {store} holds {vectors} vectors; its device addresses at most {max}")]
    StoreTooLarge { store: u32, vectors: usize, max: usize },
    #[error(transparent)]
    Interrupt(#[from] InterruptError),
}

/// An x86 MSI: the address (0xFEEx_xxxx with the destination) and data (vector, mode) a device
/// writes to signal it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsiMessage {
    pub address: u64,
    pub data: u32,
}

/// The interrupt layer of a VM as saved: its routing table's size and every MSI store it
/// handed out. The table's routes are not saved beside the vectors: each is an unmasked
/// vector's message at that vector's GSI, so the vectors say it all.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterruptState {
    /// Entries the VM's routing table may hold (KVM's limit where the VM started). The guest may
    /// have read the MSI capacity it gives, so a restore keeps it (and needs a host that allows
    /// as many).
    pub route_limit: u64,
    /// In store-id order.
    pub stores: Vec<MsiStoreState>,
}

/// One device's message store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsiStoreState {
    /// What the device's own state names its store by ([`MsiStore::id`]).
    pub id: u32,
    pub vectors: Vec<MsiVectorState>,
}

/// One MSI vector of a store.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsiVectorState {
    /// Any address the guest wrote: KVM interprets an MSI route's address rather than refusing
    /// it (the `msi` test guest routes vectors at address 0), so every value is restorable; what
    /// KVM does refuse fails the restore's commit.
    pub message: MsiMessage,
    pub masked: bool,
    /// A trigger waits: latched while masked, or kept when KVM refused it.
    pub pending: bool,
    /// Whether the vector holds a GSI (from its first unmask on); it counts against the table's
    /// MSI capacity even while masked.
    pub has_gsi: bool,
}

/// Owns the VM's routing table and the vectors of every MSI store; cheap to clone and share
/// with devices.
#[derive(Clone)]
pub struct InterruptManager {
    vm: Arc<VmFd>,
    shared: Arc<Mutex<Shared>>,
}

/// Everything behind the manager's one lock: a trigger sees its vector and the table it may
/// commit together, and a save sees every store at one instant.
struct Shared {
    table: RouteTable,
    stores: BTreeMap<u32, StoreSlot>,
}

struct StoreSlot {
    vectors: Vec<Vector>,
    /// Whether a device holds the store's [`MsiStore`] handle: from its creation on, or, for a
    /// restored store, from [`InterruptManager::claim_msi_store`] on.
    claimed: bool,
}

impl StoreSlot {
    fn claimed() -> StoreSlot {
        StoreSlot { vectors: Vec::new(), claimed: true }
    }
}

impl Shared {
    /// Vector `index` of store `store` (grown to hold it) and the table, borrowed together.
    fn vector(&mut self, store: u32, index: usize) -> (&mut RouteTable, &mut Vector) {
        // A handle's slot lives until the handle drops; recreating it keeps this total.
        let slot = self.stores.entry(store).or_insert_with(StoreSlot::claimed);
        if index >= slot.vectors.len() {
            slot.vectors.resize_with(index + 1, Vector::default);
        }
        (&mut self.table, &mut slot.vectors[index])
    }

    fn peek(&self, store: u32, index: usize) -> Option<&Vector> {
        self.stores.get(&store).and_then(|slot| slot.vectors.get(index))
    }

    /// The lowest id no store has.
    fn free_store_id(&self) -> u32 {
        let mut id = 0;
        for &taken in self.stores.keys() {
            if taken != id {
                break;
            }
            id += 1;
        }
        id
    }
}

impl InterruptManager {
    /// Takes over the VM's routing (after KVM_CREATE_IRQCHIP) and pushes the default table.
    pub fn new(vm: Arc<VmFd>) -> Result<InterruptManager, InterruptError> {
        let limit = host_route_limit(&vm);
        let shared = Shared { table: RouteTable::new(limit), stores: BTreeMap::new() };
        let manager = InterruptManager { vm, shared: Arc::new(Mutex::new(shared)) };
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
        let mut shared = self.lock();
        let id = shared.free_store_id();
        shared.stores.insert(id, StoreSlot::claimed());
        MsiStore { manager: self.clone(), id }
    }

    /// The restored store `id`, for the device whose state names it; `max_vectors` is how many
    /// vectors that device addresses.
    pub fn claim_msi_store(&self, id: u32, max_vectors: usize) -> Result<MsiStore, InterruptStateError> {
        let mut shared = self.lock();
        let slot = shared.stores.get_mut(&id).ok_or(InterruptStateError::UnknownStore(id))?;
        if slot.claimed {
            return Err(InterruptStateError::StoreClaimed(id));
        }
        if slot.vectors.len() > max_vectors {
            return Err(InterruptStateError::StoreTooLarge {
                store: id,
                vectors: slot.vectors.len(),
                max: max_vectors,
            });
        }
        slot.claimed = true;
        Ok(MsiStore { manager: self.clone(), id })
    }

    /// Restored stores no device claimed yet: after every device is back, a store here means
    /// the state and the VM's devices disagree.
    pub fn unclaimed_msi_stores(&self) -> Vec<u32> {
        self.lock().stores.iter().filter(|(_, slot)| !slot.claimed).map(|(&id, _)| id).collect()
    }

    /// MSI vectors the VM can route in all (KVM's limit minus the irqchip's routes).
    pub fn msi_capacity(&self) -> usize {
        self.lock().table.msi_capacity()
    }

    /// Delivers every unmasked vector's pending trigger (one KVM refused before, or one a
    /// restore brought back). A restore leaves them pending, since an MSI injected before the
    /// vCPUs' local APIC state is loaded would be lost; call this once it is.
    pub fn deliver_pending(&self) -> Result<(), InterruptError> {
        let mut shared = self.lock();
        let Shared { table, stores } = &mut *shared;
        for vector in stores.values_mut().flat_map(|slot| slot.vectors.iter_mut()) {
            if vector.pending && !vector.masked {
                deliver(&self.vm, table, vector)?;
            }
        }
        Ok(())
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Brings KVM's table up to date when routes changed since the last commit.
    fn flush(&self) -> Result<(), InterruptError> {
        flush(&self.vm, &mut self.lock().table)
    }
}

impl Persist for InterruptManager {
    type State = InterruptState;
    /// The new VM, its irqchip created.
    type ConstructorArgs = Arc<VmFd>;
    type Error = InterruptStateError;

    fn save(&self) -> Result<InterruptState, InterruptStateError> {
        let shared = self.lock();
        Ok(InterruptState {
            route_limit: shared.table.limit() as u64,
            stores: shared
                .stores
                .iter()
                .map(|(&id, slot)| MsiStoreState {
                    id,
                    vectors: slot.vectors.iter().map(Vector::save).collect(),
                })
                .collect(),
        })
    }

    fn restore(vm: Arc<VmFd>, state: &InterruptState) -> Result<InterruptManager, InterruptStateError> {
        let host = host_route_limit(&vm);
        let limit = match usize::try_from(state.route_limit) {
            _ if state.route_limit < LEGACY_ROUTES as u64 => {
                return Err(InterruptStateError::RouteLimitBelowIrqchip { limit: state.route_limit })
            }
            Ok(limit) if limit <= host => limit,
            _ => return Err(InterruptStateError::RouteLimitAboveHost { limit: state.route_limit, host }),
        };
        let mut table = RouteTable::new(limit);
        let mut gsis = 0usize;
        let mut saved = BTreeMap::new();
        for store in &state.stores {
            if saved.insert(store.id, store).is_some() {
                return Err(InterruptStateError::DuplicateStore(store.id));
            }
            for (index, vector) in store.vectors.iter().enumerate() {
                if !vector.masked && !vector.has_gsi {
                    return Err(InterruptStateError::UnmaskedWithoutGsi { store: store.id, index });
                }
                gsis += usize::from(vector.has_gsi);
            }
        }
        if gsis > table.msi_capacity() {
            return Err(InterruptStateError::TooManyGsis { gsis, limit, capacity: table.msi_capacity() });
        }
        let mut stores = BTreeMap::new();
        for (&id, store) in &saved {
            let vectors = store
                .vectors
                .iter()
                .map(|saved| Vector::restore(saved, &mut table))
                .collect::<Result<Vec<_>, _>>()?;
            stores.insert(id, StoreSlot { vectors, claimed: false });
        }
        let manager = InterruptManager { vm, shared: Arc::new(Mutex::new(Shared { table, stores })) };
        manager.flush()?;
        Ok(manager)
    }
}

/// KVM_CAP_IRQ_ROUTING: how many entries this host's KVM takes in a routing table.
fn host_route_limit(vm: &VmFd) -> usize {
    vm.check_extension_int(Cap::IrqRouting).max(0) as usize
}

fn commit(vm: &VmFd, table: &mut RouteTable) -> Result<(), InterruptError> {
    let routing = KvmIrqRouting::from_entries(&table.entries())
        .map_err(|_| InterruptError::RoutesExhausted { limit: table.limit(), msi: table.msi_allocated() })?;
    vm.set_gsi_routing(&routing).map_err(kvm("set the GSI routing table"))?;
    table.committed();
    Ok(())
}

fn flush(vm: &VmFd, table: &mut RouteTable) -> Result<(), InterruptError> {
    if table.changed() {
        commit(vm, table)?;
    }
    Ok(())
}

fn kvm(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> InterruptError {
    move |source| InterruptError::Kvm { what, source }
}

/// An IOAPIC pin a device raises by writing its eventfd. It holds no state a snapshot needs:
/// KVM's irqfd turns each write into an edge on the pin, and what the pin did is the irqchip's.
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

impl Vector {
    /// What the vector is; a bound irqfd has nothing to add (KVM consumed what it was sent, and
    /// masking reads back what it was not).
    fn save(&self) -> MsiVectorState {
        MsiVectorState {
            message: self.message,
            masked: self.masked,
            pending: self.pending,
            has_gsi: self.route.is_some(),
        }
    }

    /// The vector again, with a new GSI (routed when unmasked) if it had one; its irqfd is bound
    /// at its next trigger, as after any unmask.
    fn restore(saved: &MsiVectorState, table: &mut RouteTable) -> Result<Vector, InterruptError> {
        let route = if saved.has_gsi {
            let event = EventFd::new(libc::EFD_NONBLOCK).map_err(InterruptError::EventFd)?;
            let gsi = table.allocate()?;
            table.route(gsi, (!saved.masked).then_some(saved.message));
            Some(Route { gsi, event, bound: false })
        } else {
            None
        };
        Ok(Vector { message: saved.message, masked: saved.masked, pending: saved.pending, route })
    }
}

/// Signals `vector`: delivered now when unmasked (KVM's table and the irqfd brought up to date
/// first), else latched as pending.
fn deliver(vm: &VmFd, table: &mut RouteTable, vector: &mut Vector) -> Result<(), InterruptError> {
    let Some(route) = vector.route.as_mut().filter(|_| !vector.masked) else {
        vector.pending = true;
        return Ok(());
    };
    let bound = flush(vm, table).and_then(|()| {
        if !route.bound {
            vm.register_irqfd(&route.event, route.gsi).map_err(kvm("bind an MSI irqfd"))?;
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

/// A device's own interrupt message store: as many vectors as the device asks for, each with
/// its message, mask and pending bit. The vectors live in the manager (a snapshot reaches them
/// there); the store is the device's handle on them.
pub struct MsiStore {
    manager: InterruptManager,
    id: u32,
}

impl MsiStore {
    /// What the manager's saved state calls this store; the device saves it to claim the store
    /// back on restore.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Vectors the store holds (it grows when a higher index is written).
    pub fn len(&self) -> usize {
        self.manager.lock().stores.get(&self.id).map_or(0, |slot| slot.vectors.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn message(&self, index: usize) -> MsiMessage {
        self.manager.lock().peek(self.id, index).map(|v| v.message).unwrap_or_default()
    }

    pub fn is_masked(&self, index: usize) -> bool {
        self.manager.lock().peek(self.id, index).is_none_or(|v| v.masked)
    }

    pub fn is_pending(&self, index: usize) -> bool {
        self.manager.lock().peek(self.id, index).is_some_and(|v| v.pending)
    }

    /// The GSI KVM routes this vector through, once it has one.
    pub fn gsi(&self, index: usize) -> Option<u32> {
        self.manager.lock().peek(self.id, index).and_then(|v| v.route.as_ref().map(|r| r.gsi))
    }

    /// Sets the message; an unmasked vector fires with it from its next trigger on.
    pub fn set_message(&mut self, index: usize, message: MsiMessage) -> Result<(), InterruptError> {
        let mut shared = self.manager.lock();
        let (table, vector) = shared.vector(self.id, index);
        vector.message = message;
        if let (false, Some(route)) = (vector.masked, &vector.route) {
            table.route(route.gsi, Some(message));
        }
        Ok(())
    }

    /// Masks the vector: its route and irqfd go, and triggers latch as pending.
    pub fn mask(&mut self, index: usize) -> Result<(), InterruptError> {
        let vm = &self.manager.vm;
        let mut shared = self.manager.lock();
        let (table, vector) = shared.vector(self.id, index);
        if vector.masked {
            return Ok(());
        }
        vector.masked = true;
        if let Some(route) = &mut vector.route {
            if route.bound {
                vm.unregister_irqfd(&route.event, route.gsi).map_err(kvm("unbind an MSI irqfd"))?;
                route.bound = false;
                // Anything the device signalled just before is now pending, not lost.
                if route.event.read().is_ok() {
                    vector.pending = true;
                }
            }
            table.route(route.gsi, None);
        }
        Ok(())
    }

    /// Unmasks the vector, allocating its GSI on first use, and delivers a pending trigger (also
    /// one an unmasked vector kept because KVM refused it before).
    pub fn unmask(&mut self, index: usize) -> Result<(), InterruptError> {
        let vm = &self.manager.vm;
        let mut shared = self.manager.lock();
        let (table, vector) = shared.vector(self.id, index);
        if !vector.masked {
            return if vector.pending { deliver(vm, table, vector) } else { Ok(()) };
        }
        if vector.route.is_none() {
            let event = EventFd::new(libc::EFD_NONBLOCK).map_err(InterruptError::EventFd)?;
            let gsi = table.allocate()?;
            vector.route = Some(Route { gsi, event, bound: false });
        }
        if let Some(route) = &vector.route {
            table.route(route.gsi, Some(vector.message));
        }
        vector.masked = false;
        if std::mem::take(&mut vector.pending) {
            deliver(vm, table, vector)?;
        }
        Ok(())
    }

    /// Signals the vector: delivered now when unmasked (KVM's table and the irqfd brought up to
    /// date first), else latched as pending.
    pub fn trigger(&mut self, index: usize) -> Result<(), InterruptError> {
        let vm = &self.manager.vm;
        let mut shared = self.manager.lock();
        let (table, vector) = shared.vector(self.id, index);
        deliver(vm, table, vector)
    }
}

impl Drop for MsiStore {
    fn drop(&mut self) {
        let vm = &self.manager.vm;
        let mut shared = self.manager.lock();
        let Shared { table, stores } = &mut *shared;
        if let Some(slot) = stores.remove(&self.id) {
            for route in slot.vectors.iter().filter_map(|v| v.route.as_ref()) {
                if route.bound {
                    let _ = vm.unregister_irqfd(&route.event, route.gsi);
                }
                table.release(route.gsi);
            }
        }
        let _ = flush(vm, table);
    }
}

/// KVM VMs for the tests of the interrupt layer and the devices that use it.
#[cfg(test)]
pub(crate) mod testing {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use kvm_bindings::kvm_lapic_state;
    use kvm_ioctls::{Kvm, VcpuFd, VmFd};

    const APIC_SPIV: usize = 0xf0;
    const APIC_SOFTWARE_ENABLE: u32 = 0x100;
    const APIC_IRR: usize = 0x200;

    /// A VM with KVM's irqchip and one vCPU, never run, whose local APIC (ID 0) accepts fixed
    /// interrupts: an MSI sent to it waits in its IRR.
    pub(crate) struct TestVm {
        pub vm: Arc<VmFd>,
        vcpu: VcpuFd,
    }

    impl TestVm {
        pub fn new() -> TestVm {
            let kvm = Kvm::new().expect("these tests need /dev/kvm");
            let vm = kvm.create_vm().expect("create a VM");
            vm.create_irq_chip().expect("create the in-kernel irqchip");
            let vcpu = vm.create_vcpu(0).expect("create a vCPU");
            let mut lapic = vcpu.get_lapic().expect("read the local APIC");
            let spiv = register(&lapic, APIC_SPIV) | APIC_SOFTWARE_ENABLE;
            for (i, byte) in spiv.to_le_bytes().into_iter().enumerate() {
                lapic.regs[APIC_SPIV + i] = byte as _;
            }
            vcpu.set_lapic(&lapic).expect("enable the local APIC");
            TestVm { vm: Arc::new(vm), vcpu }
        }

        /// Whether `vector` is in the IRR now.
        pub fn has(&self, vector: u8) -> bool {
            let lapic = self.vcpu.get_lapic().expect("read the local APIC");
            register(&lapic, APIC_IRR + usize::from(vector / 32) * 0x10) & (1 << (vector % 32)) != 0
        }

        /// Whether `vector` reaches the IRR within a second (KVM may inject from a worker).
        pub fn received(&self, vector: u8) -> bool {
            let deadline = Instant::now() + Duration::from_secs(1);
            while !self.has(vector) {
                if Instant::now() >= deadline {
                    return false;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            true
        }
    }

    fn register(lapic: &kvm_lapic_state, offset: usize) -> u32 {
        u32::from_le_bytes(std::array::from_fn(|i| lapic.regs[offset + i] as u8))
    }
}

#[cfg(test)]
mod tests {
    use super::testing::TestVm;
    use super::*;

    fn message(vector: u8) -> MsiMessage {
        MsiMessage { address: 0xfee0_0000, data: vector.into() }
    }

    fn vector(message: MsiMessage, masked: bool, pending: bool, has_gsi: bool) -> MsiVectorState {
        MsiVectorState { message, masked, pending, has_gsi }
    }

    fn routes(manager: &InterruptManager) -> usize {
        manager.lock().table.entries().len()
    }

    #[test]
    fn stores_survive_a_restore_onto_a_new_vm_and_pending_msis_arrive_on_unmask() {
        let old = TestVm::new();
        let manager = InterruptManager::new(old.vm.clone()).unwrap();
        let mut first = manager.msi_store();
        let mut second = manager.msi_store();
        assert_eq!((first.id(), second.id()), (0, 1));
        first.set_message(0, message(0x41)).unwrap();
        first.unmask(0).unwrap();
        first.trigger(0).unwrap();
        assert!(old.received(0x41), "routed before the save");
        first.mask(0).unwrap();
        first.trigger(0).unwrap();
        assert!(first.is_pending(0));
        first.set_message(2, message(0x42)).unwrap();
        first.unmask(2).unwrap();
        first.set_message(5, message(0x43)).unwrap();
        second.set_message(0, message(0x44)).unwrap();
        second.trigger(0).unwrap();

        let state = manager.save().unwrap();
        let masked_default = vector(MsiMessage::default(), true, false, false);
        assert_eq!(
            state.stores,
            [
                MsiStoreState {
                    id: 0,
                    vectors: vec![
                        vector(message(0x41), true, true, true),
                        masked_default,
                        vector(message(0x42), false, false, true),
                        masked_default,
                        masked_default,
                        vector(message(0x43), true, false, false),
                    ],
                },
                MsiStoreState { id: 1, vectors: vec![vector(message(0x44), true, true, false)] },
            ]
        );
        assert_eq!(state.route_limit, manager.lock().table.limit() as u64);

        let new = TestVm::new();
        let restored = InterruptManager::restore(new.vm.clone(), &state).unwrap();
        assert_eq!(restored.save().unwrap(), state);
        assert_eq!(restored.msi_capacity(), manager.msi_capacity());
        assert_eq!(routes(&restored), LEGACY_ROUTES + 1, "only the unmasked vector is routed");
        assert!(!restored.lock().table.changed(), "the restore committed the table to KVM");
        assert_eq!(restored.unclaimed_msi_stores(), [0, 1]);
        let mut first = restored.claim_msi_store(0, 16).unwrap();
        let mut second = restored.claim_msi_store(1, 16).unwrap();
        assert!(restored.unclaimed_msi_stores().is_empty());
        assert_eq!(restored.save().unwrap(), state, "save, restore, save: the same state");
        assert!(first.gsi(0).is_some() && first.gsi(2).is_some() && first.gsi(5).is_none());

        assert!(!new.has(0x41), "a masked vector's pending trigger waits");
        first.unmask(0).unwrap();
        assert!(new.received(0x41), "unmasking delivers what was pending at the save");
        assert!(!first.is_pending(0));
        first.trigger(2).unwrap();
        assert!(new.received(0x42), "an unmasked vector routes again");
        second.unmask(0).unwrap();
        assert!(new.received(0x44), "a pending vector that never had a GSI gets one and fires");
        assert_eq!(routes(&restored), LEGACY_ROUTES + 3);
        let third = restored.msi_store();
        assert_eq!(third.id(), 2, "new stores take ids the restored ones left");
    }

    #[test]
    fn an_unmasked_vector_kept_pending_is_delivered_once_asked() {
        let vm = TestVm::new();
        let limit = host_route_limit(&vm.vm) as u64;
        let state = InterruptState {
            route_limit: limit,
            stores: vec![MsiStoreState { id: 7, vectors: vec![vector(message(0x45), false, true, true)] }],
        };
        let manager = InterruptManager::restore(vm.vm.clone(), &state).unwrap();
        let store = manager.claim_msi_store(7, 1).unwrap();
        assert!(store.is_pending(0) && !vm.has(0x45), "a restore delivers nothing by itself");
        manager.deliver_pending().unwrap();
        assert!(vm.received(0x45));
        assert!(!store.is_pending(0));
        assert_eq!(manager.msi_store().id(), 0, "the lowest free id");
    }

    #[test]
    fn a_restored_table_keeps_its_saved_size() {
        let vm = TestVm::new();
        let state = InterruptState { route_limit: LEGACY_ROUTES as u64 + 1, stores: Vec::new() };
        let manager = InterruptManager::restore(vm.vm.clone(), &state).unwrap();
        assert_eq!(manager.msi_capacity(), 1, "the capacity the guest saw, not the host's");
        let mut store = manager.msi_store();
        store.unmask(0).unwrap();
        let error = store.unmask(1).unwrap_err();
        assert!(matches!(error, InterruptError::RoutesExhausted { limit: 41, msi: 1 }), "{error}");
        assert_eq!(manager.save().unwrap().route_limit, 41);
    }

    #[test]
    fn a_dropped_store_gives_its_gsis_back_and_leaves_the_state() {
        let vm = TestVm::new();
        let manager = InterruptManager::new(vm.vm.clone()).unwrap();
        let mut store = manager.msi_store();
        store.set_message(0, message(0x46)).unwrap();
        store.unmask(0).unwrap();
        store.trigger(0).unwrap();
        assert_eq!(routes(&manager), LEGACY_ROUTES + 1);
        drop(store);
        assert_eq!(routes(&manager), LEGACY_ROUTES);
        assert!(manager.save().unwrap().stores.is_empty());
        assert_eq!(manager.lock().table.msi_allocated(), 0);
    }

    #[test]
    fn malformed_states_are_refused() {
        let vm = TestVm::new();
        let host = host_route_limit(&vm.vm) as u64;
        let restore = |route_limit: u64, stores: Vec<MsiStoreState>| {
            InterruptManager::restore(vm.vm.clone(), &InterruptState { route_limit, stores }).err()
        };
        let store = |id: u32, vectors: Vec<MsiVectorState>| MsiStoreState { id, vectors };
        let routed = vector(message(0x40), false, false, true);

        let error = restore(39, Vec::new()).unwrap();
        assert!(matches!(error, InterruptStateError::RouteLimitBelowIrqchip { limit: 39 }), "{error}");
        assert_eq!(
            error.to_string(),
            "the interrupt state's routing table holds 39 routes, fewer than the 40 KVM's irqchip takes"
        );
        for limit in [host + 1, u64::MAX] {
            let error = restore(limit, Vec::new()).unwrap();
            assert!(matches!(error, InterruptStateError::RouteLimitAboveHost { .. }), "{error}");
        }
        let error = restore(host, vec![store(3, vec![]), store(3, vec![])]).unwrap();
        assert!(matches!(error, InterruptStateError::DuplicateStore(3)), "{error}");
        let unmasked = vector(message(0x40), false, false, false);
        let error = restore(host, vec![store(0, vec![routed, unmasked])]).unwrap();
        assert!(matches!(error, InterruptStateError::UnmaskedWithoutGsi { store: 0, index: 1 }), "{error}");
        let error = restore(42, vec![store(0, vec![routed, routed]), store(1, vec![routed])]).unwrap();
        assert!(
            matches!(error, InterruptStateError::TooManyGsis { gsis: 3, limit: 42, capacity: 2 }),
            "{error}"
        );
        assert_eq!(
            error.to_string(),
            "the interrupt state's MSI vectors hold 3 GSIs; a table of 42 routes has room for 2"
        );

        let manager = InterruptManager::restore(
            vm.vm.clone(),
            &InterruptState { route_limit: host, stores: vec![store(0, vec![routed; 3]), store(1, vec![])] },
        )
        .unwrap();
        let error = manager.claim_msi_store(2, 16).err().unwrap();
        assert!(matches!(error, InterruptStateError::UnknownStore(2)), "{error}");
        let error = manager.claim_msi_store(0, 2).err().unwrap();
        assert!(
            matches!(error, InterruptStateError::StoreTooLarge { store: 0, vectors: 3, max: 2 }),
            "{error}"
        );
        let _store = manager.claim_msi_store(0, 3).unwrap();
        let error = manager.claim_msi_store(0, 3).err().unwrap();
        assert!(matches!(error, InterruptStateError::StoreClaimed(0)), "{error}");
        let live = manager.msi_store();
        let error = manager.claim_msi_store(live.id(), 3).err().unwrap();
        assert!(matches!(error, InterruptStateError::StoreClaimed(2)), "{error}");
    }

    #[test]
    fn any_message_address_the_guest_can_program_is_restored() {
        let vm = TestVm::new();
        let host = host_route_limit(&vm.vm) as u64;
        let odd = [0, 0xffff_ffff_ffff_ffff, 0x1_fee0_0000];
        let vectors = odd
            .iter()
            .map(|&address| vector(MsiMessage { address, data: 0x30 }, false, false, true))
            .collect();
        let state = InterruptState { route_limit: host, stores: vec![MsiStoreState { id: 0, vectors }] };
        let manager = InterruptManager::restore(vm.vm.clone(), &state).unwrap();
        assert_eq!(manager.save().unwrap(), state);
        assert_eq!(routes(&manager), LEGACY_ROUTES + odd.len());
    }
}
