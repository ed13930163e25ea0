//! The dirty log against a real-mode guest that writes a known set of pages: a harvest finds
//! exactly those, plus the pages carve itself wrote through vm-memory (which KVM cannot see),
//! and the next harvest starts empty.

use std::sync::Arc;

use carve_vmm::dirty_log::DirtyLog;
use carve_vmm::memory::{self, MemoryBacking};
use kvm_ioctls::{Kvm, VcpuExit};
use vm_memory::{Bytes, GuestAddress};

fn kvm_usable(test: &str) -> bool {
    match std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        Ok(_) => true,
        Err(e) => {
            let required = std::env::var_os("CARVE_REAL_KVM").is_some_and(|v| v == "1");
            assert!(!required, "{test}: /dev/kvm is not usable on the real KVM host ({e})");
            eprintln!("SKIPPED {test}: /dev/kvm is not usable here ({e})");
            false
        }
    }
}

const CODE: u64 = 0x1000;

#[test]
fn a_harvest_finds_exactly_the_pages_the_guest_and_the_devices_wrote() {
    if !kvm_usable("a_harvest_finds_exactly_the_pages_the_guest_and_the_devices_wrote") {
        return;
    }
    let kvm = Kvm::new().unwrap();
    let vm = Arc::new(kvm.create_vm().unwrap());
    let mem = memory::create(16, MemoryBacking::Anonymous).unwrap();
    memory::register(&vm, &mem).unwrap();
    // mov [0x5000], al; mov [0x9ff8], al; mov [0xc000], al; hlt (16-bit, DS = 0).
    let code = [0xa2, 0x00, 0x50, 0xa2, 0xf8, 0x9f, 0xa2, 0x00, 0xc0, 0xf4];
    mem.write_slice(&code, GuestAddress(CODE)).unwrap();
    let vcpu = vm.create_vcpu(0).unwrap();
    let mut sregs = vcpu.get_sregs().unwrap();
    for segment in [&mut sregs.cs, &mut sregs.ds] {
        segment.base = 0;
        segment.selector = 0;
    }
    vcpu.set_sregs(&sregs).unwrap();
    let regs = kvm_bindings::kvm_regs { rip: CODE, rax: 0x5a, rflags: 2, ..Default::default() };
    vcpu.set_regs(&regs).unwrap();

    let mut log = DirtyLog::start(vm.clone(), &mem).unwrap();
    assert_eq!(log.harvest(&mem).unwrap().count(), 0, "nothing was written since the start");
    mem.write_obj(7u64, GuestAddress(0x3008)).unwrap();
    let mut vcpu = vcpu;
    match vcpu.run().unwrap() {
        VcpuExit::Hlt => {}
        exit => panic!("unexpected exit {exit:?}"),
    }
    let dirty = without_code_page(log.harvest(&mem).unwrap().addresses().collect());
    assert_eq!(dirty, vec![0x3000, 0x5000, 0x9000, 0xc000], "guest writes and the device write");
    assert_eq!(log.harvest(&mem).unwrap().count(), 0, "a harvest clears what it found");

    // Once more: the pages were write-protected again, so a second write is seen again.
    let regs = kvm_bindings::kvm_regs { rip: CODE, rax: 0xa5, rflags: 2, ..Default::default() };
    vcpu.set_regs(&regs).unwrap();
    assert!(matches!(vcpu.run().unwrap(), VcpuExit::Hlt));
    let dirty = without_code_page(log.harvest(&mem).unwrap().addresses().collect());
    assert_eq!(dirty, vec![0x5000, 0x9000, 0xc000]);
    eprintln!("manual dirty-log protect: {}", log.manual_protect());
}

/// The harvest less the page the guest runs from: on the emulated KVM host (QEMU's TCG SVM under
/// KVM's nested paging) that page shows as written too, though the guest only fetched from it;
/// our nested build host does not mark it. Everything else must match exactly.
fn without_code_page(mut dirty: Vec<u64>) -> Vec<u64> {
    if dirty.first() == Some(&CODE) {
        eprintln!("the code page at {CODE:#x} was marked dirty by this host's KVM");
        dirty.remove(0);
    }
    dirty
}
