//! The VM's GSI routing table as carve keeps it. KVM_SET_GSI_ROUTING replaces the whole table,
//! so the table is rebuilt from this model on every change: first KVM's default irqchip routes
//! (GSIs 0–15 to the PIC and IOAPIC, 16–23 to the IOAPIC), then every unmasked MSI route.

use std::collections::BTreeMap;

use kvm_bindings::{
    kvm_irq_routing_entry, kvm_irq_routing_msi, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};

use super::{InterruptError, MsiMessage};

/// IOAPIC pins, which are also the legacy GSIs 0..24.
pub const IOAPIC_PINS: u32 = 24;
/// ISA IRQs, which KVM also wires to the dual 8259 PIC.
const PIC_IRQS: u32 = 16;
/// Table entries the irqchip defaults take: two per ISA IRQ, one per other IOAPIC pin.
pub const LEGACY_ROUTES: usize = (2 * PIC_IRQS + (IOAPIC_PINS - PIC_IRQS)) as usize;

/// The route set and GSI allocator of one VM.
#[derive(Debug)]
pub struct RouteTable {
    /// KVM_CAP_IRQ_ROUTING: the most entries a table may hold, and the first invalid GSI.
    limit: usize,
    /// Allocated MSI GSIs; `None` while the vector is masked (allocated but not routed).
    msi: BTreeMap<u32, Option<MsiMessage>>,
    free: Vec<u32>,
    next_gsi: u32,
    /// Whether KVM's copy is behind this model (routes changed since the last commit).
    changed: bool,
}

impl RouteTable {
    pub fn new(limit: usize) -> RouteTable {
        RouteTable { limit, msi: BTreeMap::new(), free: Vec::new(), next_gsi: IOAPIC_PINS, changed: true }
    }

    /// KVM's limit on routing-table entries.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// How many MSI GSIs this VM can hold at most.
    pub fn msi_capacity(&self) -> usize {
        self.limit.saturating_sub(LEGACY_ROUTES)
    }

    pub fn msi_allocated(&self) -> usize {
        self.msi.len()
    }

    /// Reserves a GSI for an MSI vector; it carries no route until [`RouteTable::route`].
    pub fn allocate(&mut self) -> Result<u32, InterruptError> {
        if self.msi.len() >= self.msi_capacity() {
            return Err(InterruptError::RoutesExhausted { limit: self.limit, msi: self.msi.len() });
        }
        let gsi = match self.free.pop() {
            Some(gsi) => gsi,
            None => {
                let gsi = self.next_gsi;
                self.next_gsi += 1;
                gsi
            }
        };
        debug_assert!((gsi as usize) < self.limit, "capacity keeps GSIs below the limit");
        self.msi.insert(gsi, None);
        Ok(gsi)
    }

    pub fn release(&mut self, gsi: u32) {
        if let Some(message) = self.msi.remove(&gsi) {
            self.free.push(gsi);
            self.changed |= message.is_some();
        }
    }

    /// Routes `gsi` to `message`, or takes its route away with `None` (masking).
    pub fn route(&mut self, gsi: u32, message: Option<MsiMessage>) {
        if let Some(slot) = self.msi.get_mut(&gsi) {
            self.changed |= *slot != message;
            *slot = message;
        }
    }

    /// Whether routes changed since [`RouteTable::committed`] was last called.
    pub fn changed(&self) -> bool {
        self.changed
    }

    /// Notes that KVM now holds this table.
    pub fn committed(&mut self) {
        self.changed = false;
    }

    pub fn routed(&self, gsi: u32) -> Option<MsiMessage> {
        self.msi.get(&gsi).copied().flatten()
    }

    /// The table as KVM_SET_GSI_ROUTING takes it.
    pub fn entries(&self) -> Vec<kvm_irq_routing_entry> {
        let mut entries = Vec::with_capacity(LEGACY_ROUTES + self.msi.len());
        for gsi in 0..IOAPIC_PINS {
            entries.push(irqchip_entry(gsi, KVM_IRQCHIP_IOAPIC, gsi));
            if gsi < PIC_IRQS {
                let chip = if gsi < 8 { KVM_IRQCHIP_PIC_MASTER } else { KVM_IRQCHIP_PIC_SLAVE };
                entries.push(irqchip_entry(gsi, chip, gsi % 8));
            }
        }
        for (&gsi, message) in &self.msi {
            if let Some(message) = message {
                entries.push(msi_entry(gsi, *message));
            }
        }
        entries
    }
}

fn irqchip_entry(gsi: u32, irqchip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut entry = kvm_irq_routing_entry { gsi, type_: KVM_IRQ_ROUTING_IRQCHIP, ..Default::default() };
    entry.u.irqchip.irqchip = irqchip;
    entry.u.irqchip.pin = pin;
    entry
}

fn msi_entry(gsi: u32, message: MsiMessage) -> kvm_irq_routing_entry {
    let mut entry = kvm_irq_routing_entry { gsi, type_: KVM_IRQ_ROUTING_MSI, ..Default::default() };
    entry.u.msi = kvm_irq_routing_msi {
        address_lo: message.address as u32,
        address_hi: (message.address >> 32) as u32,
        data: message.data,
        ..Default::default()
    };
    entry
}

#[cfg(test)]
mod tests {
    use super::*;

    const MESSAGE: MsiMessage = MsiMessage { address: 0xfee0_0000, data: 0x41 };

    #[test]
    fn default_routes_match_kvms_irqchip_defaults() {
        let table = RouteTable::new(4096);
        let entries = table.entries();
        assert_eq!(entries.len(), LEGACY_ROUTES);
        assert_eq!(LEGACY_ROUTES, 40);
        let routes: Vec<_> = entries
            .iter()
            .map(|e| {
                // SAFETY: every entry here is an irqchip entry, so reading that union arm is sound.
                let irqchip = unsafe { e.u.irqchip };
                (e.gsi, irqchip.irqchip, irqchip.pin)
            })
            .collect();
        assert!(routes.contains(&(3, KVM_IRQCHIP_PIC_MASTER, 3)));
        assert!(routes.contains(&(12, KVM_IRQCHIP_PIC_SLAVE, 4)));
        assert!(routes.contains(&(20, KVM_IRQCHIP_IOAPIC, 20)));
        assert!(!routes.iter().any(|&(gsi, chip, _)| gsi >= 16 && chip != KVM_IRQCHIP_IOAPIC));
    }

    #[test]
    fn allocation_starts_above_the_ioapic_and_reuses_released_gsis() {
        let mut table = RouteTable::new(4096);
        let a = table.allocate().unwrap();
        let b = table.allocate().unwrap();
        assert_eq!((a, b), (24, 25));
        table.release(a);
        table.release(a); // a second release is harmless
        assert_eq!(table.allocate().unwrap(), a);
        assert_eq!(table.msi_allocated(), 2);
    }

    #[test]
    fn masked_vectors_hold_a_gsi_but_no_route() {
        let mut table = RouteTable::new(4096);
        let gsi = table.allocate().unwrap();
        assert_eq!(table.entries().len(), LEGACY_ROUTES, "allocated, not yet routed");
        table.route(gsi, Some(MESSAGE));
        let entries = table.entries();
        assert_eq!(entries.len(), LEGACY_ROUTES + 1);
        let last = entries.last().unwrap();
        assert_eq!((last.gsi, last.type_), (gsi, KVM_IRQ_ROUTING_MSI));
        // SAFETY: the entry's type says MSI.
        let msi = unsafe { last.u.msi };
        assert_eq!((msi.address_lo, msi.address_hi, msi.data), (0xfee0_0000, 0, 0x41));
        table.route(gsi, None);
        assert_eq!(table.entries().len(), LEGACY_ROUTES, "masking rebuilds the table without it");
        assert_eq!(table.routed(gsi), None);
    }

    #[test]
    fn only_route_changes_leave_kvms_copy_behind() {
        let mut table = RouteTable::new(4096);
        assert!(table.changed(), "KVM has not seen the default routes yet");
        table.committed();
        let gsi = table.allocate().unwrap();
        assert!(!table.changed(), "a GSI without a route changes nothing in KVM");
        table.route(gsi, Some(MESSAGE));
        assert!(table.changed());
        table.committed();
        table.route(gsi, Some(MESSAGE));
        assert!(!table.changed(), "the same route again");
        table.route(gsi, None);
        assert!(table.changed(), "masking takes the route away");
        table.committed();
        table.release(gsi);
        assert!(!table.changed(), "releasing a masked vector's GSI");
    }

    #[test]
    fn exhaustion_is_an_error_at_kvms_limit_and_release_makes_room() {
        let mut table = RouteTable::new(4096);
        let capacity = table.msi_capacity();
        assert_eq!(capacity, 4096 - 40);
        let gsis: Vec<u32> = (0..capacity).map(|_| table.allocate().unwrap()).collect();
        assert!(gsis.iter().all(|&gsi| gsi < 4096), "every GSI stays below KVM's limit");
        for &gsi in &gsis {
            table.route(gsi, Some(MESSAGE));
        }
        assert_eq!(table.entries().len(), 4096, "a full table is exactly KVM's limit");
        let error = table.allocate().unwrap_err();
        assert!(matches!(error, InterruptError::RoutesExhausted { limit: 4096, msi: 4056 }), "{error}");
        assert!(error.to_string().contains("4096"), "{error}");
        table.release(gsis[100]);
        assert_eq!(table.allocate().unwrap(), gsis[100]);
    }
}
