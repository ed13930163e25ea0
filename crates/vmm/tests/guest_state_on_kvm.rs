//! VM-entry checks against the real /dev/kvm: the states carve builds pass, and a bad state is
//! refused (debug policy), warned about, and explained if the host then fails the entry.

use carve_guest_images::{path, Format};
use carve_vmm::guest_state::file::StateFile;
use carve_vmm::guest_state::{check, Platform};
use carve_vmm::{EntryCheck, KernelSpec, SerialSink, Vm, VmConfig, VmError, VmExit};

fn kvm_usable(test: &str) -> bool {
    let usable = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok();
    if !usable {
        eprintln!("SKIPPED {test}: /dev/kvm is not usable here");
    }
    usable
}

fn config(format: Format) -> VmConfig {
    let mut config = VmConfig::new(KernelSpec::Path(path("demo", format)));
    config.serial = SerialSink::None;
    config
}

fn boot_state(vm: &Vm) -> StateFile {
    let vcpu = vm.boot_vcpu();
    StateFile::from_kvm(&vcpu.get_sregs().unwrap(), vcpu.get_regs().unwrap().rflags)
}

fn broken(state: &StateFile, platform: Platform) -> Vec<&'static str> {
    check(&state.guest_state(&platform), &platform).iter().map(|v| v.rule).collect()
}

#[test]
fn the_states_carve_builds_pass_the_entry_checks() {
    if !kvm_usable("the_states_carve_builds_pass_the_entry_checks") {
        return;
    }
    for format in [Format::BzImage, Format::Pvh, Format::Multiboot] {
        let mut config = config(format);
        config.vcpus = 2;
        config.entry_check = EntryCheck::Refuse;
        let vm = Vm::build(config, Vec::new()).unwrap_or_else(|e| panic!("{format:?}: {e}"));
        let state = boot_state(&vm);
        assert_eq!(broken(&state, Platform::intel(true)), Vec::<&str>::new(), "{format:?}");
        // Without unrestricted guest only the 64-bit entry can be entered directly; KVM runs
        // the 32-bit unpaged entry by emulation there.
        let expected: &[&str] = if format == Format::BzImage { &[] } else { &["C2"] };
        assert_eq!(broken(&state, Platform::intel(false)), expected, "{format:?}");
    }
}

fn bzimage_state() -> StateFile {
    boot_state(&Vm::build(config(Format::BzImage), Vec::new()).unwrap())
}

#[test]
fn a_bad_state_is_refused_in_debug_and_explained_when_entered() {
    if !kvm_usable("a_bad_state_is_refused_in_debug_and_explained_when_entered") {
        return;
    }
    let mut state = bzimage_state();
    state.tr.selector |= 4;

    let mut refuse = config(Format::BzImage);
    (refuse.load_state, refuse.entry_check) = (Some(state), EntryCheck::Refuse);
    match Vm::build(refuse, Vec::new()) {
        Err(e @ VmError::InvalidGuestState { .. }) => {
            assert!(e.to_string().contains("tr.selector = 0x24: the TI flag (bit 2) must be 0 [S1"), "{e}")
        }
        Err(e) => panic!("unexpected error: {e}"),
        Ok(_) => panic!("a TR selector with TI = 1 was accepted"),
    }

    let mut warn = config(Format::BzImage);
    (warn.load_state, warn.entry_check) = (Some(state), EntryCheck::Warn);
    let vm = Vm::build(warn, Vec::new()).unwrap();
    assert_eq!(vm.entry_warnings().len(), 1);
    assert!(vm.entry_warnings()[0].contains("[S1"), "{:?}", vm.entry_warnings());
    match vm.run().unwrap().exit {
        VmExit::Crash(report) => {
            // Intel hardware refuses it: 0x80000021, explained by the broken rule.
            assert!(report.explanation.contains("KVM_EXIT_FAIL_ENTRY"), "{}", report.explanation);
            assert!(report.explanation.contains("[S1"), "{}", report.explanation);
            eprintln!("the host failed the entry; carve explained it: {}", report.explanation);
        }
        VmExit::Reset => eprintln!(
            "NOTE: this host entered the state anyway (AMD SVM does not check segment selectors); \
             the warning was the only report"
        ),
        other => panic!("unexpected end: {other:?}"),
    }
}

#[test]
fn a_state_kvm_refuses_is_explained() {
    if !kvm_usable("a_state_kvm_refuses_is_explained") {
        return;
    }
    let mut state = bzimage_state();
    state.cr0 |= 1 << 29;
    let mut warn = config(Format::BzImage);
    (warn.load_state, warn.entry_check) = (Some(state), EntryCheck::Warn);
    match Vm::build(warn, Vec::new()) {
        Err(e @ VmError::StateRefused { .. }) => {
            let text = e.to_string();
            assert!(
                text.contains("cr0.nw = 0x1: CR0.NW = 1 requires CR0.CD = 1 [K2 KVM_SET_SREGS]"),
                "{text}"
            );
        }
        Err(e) => panic!("unexpected error: {e}"),
        Ok(_) => panic!("KVM accepted CR0.NW without CR0.CD"),
    }
}
