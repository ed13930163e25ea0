//! Whether a destination can run a guest: every CPUID feature bit the guest may be using must be
//! one this destination offers (its KVM's, narrowed by its CPU template), checked before any
//! memory moves. A guest that found AVX-512 at boot keeps using it; a host without it would
//! fault it at the first instruction.

use crate::kvm_state::CpuidEntry;

/// Reads one register of an entry.
type Register = fn(&CpuidEntry) -> u32;

/// The feature registers: (leaf, sub-leaf, register name, which register).
const FEATURE_REGISTERS: [(u32, u32, &str, Register); 10] = [
    (0x1, 0, "ECX", |e| e.ecx),
    (0x1, 0, "EDX", |e| e.edx),
    (0x7, 0, "EBX", |e| e.ebx),
    (0x7, 0, "ECX", |e| e.ecx),
    (0x7, 0, "EDX", |e| e.edx),
    (0x7, 1, "EAX", |e| e.eax),
    (0xd, 1, "EAX", |e| e.eax),
    (0x8000_0001, 0, "ECX", |e| e.ecx),
    (0x8000_0001, 0, "EDX", |e| e.edx),
    (0x8000_0008, 0, "EBX", |e| e.ebx),
];

/// Bits that are state, not features: KVM sets them as the guest changes CR4 or the APIC base
/// (OSXSAVE, OSPKE, APIC), or carve sets them for the topology it gives (HTT).
fn dynamic(leaf: u32, register: &str) -> u32 {
    match (leaf, register) {
        (0x1, "ECX") => 1 << 27,
        (0x1, "EDX") => (1 << 9) | (1 << 28),
        (0x7, "ECX") => 1 << 4,
        _ => 0,
    }
}

/// The guest's feature bits that `offered` lacks, each as `CPUID leaf 0x7.0 EBX bit 16`.
pub fn missing_features(guest: &[CpuidEntry], offered: &[CpuidEntry]) -> Vec<String> {
    let find = |table: &[CpuidEntry], leaf: u32, sub: u32| {
        table.iter().find(|e| e.function == leaf && e.index == sub).copied()
    };
    let mut missing = Vec::new();
    for (leaf, sub, name, read) in FEATURE_REGISTERS {
        let Some(used) = find(guest, leaf, sub) else { continue };
        let have = find(offered, leaf, sub).map_or(0, |e| read(&e));
        let lacking = read(&used) & !have & !dynamic(leaf, name);
        for bit in (0..32).filter(|b| lacking & (1 << b) != 0) {
            missing.push(format!("CPUID leaf {leaf:#x}.{sub} {name} bit {bit}"));
        }
    }
    missing
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32, ebx: u32, ecx: u32) -> CpuidEntry {
        CpuidEntry { function, index, ebx, ecx, ..Default::default() }
    }

    #[test]
    fn features_the_destination_lacks_are_named() {
        let guest = [leaf(0x7, 0, (1 << 16) | 1, 1 << 4), leaf(0x1, 0, 0, (1 << 27) | (1 << 28))];
        let host = [leaf(0x7, 0, 1, 0), leaf(0x1, 0, 0, 1 << 28)];
        assert_eq!(missing_features(&guest, &host), vec!["CPUID leaf 0x7.0 EBX bit 16".to_string()]);
        assert!(missing_features(&guest, &guest).is_empty());
        // A leaf the destination does not have at all lacks every bit the guest uses of it.
        assert_eq!(missing_features(&guest[..1], &host[1..]).len(), 2);
    }
}
