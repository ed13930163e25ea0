//! `Persist` for a whole VM on the real /dev/kvm: a VM built but not yet run saves itself (each
//! vCPU, KVM's VM-wide state, every device), restores from the snapshot directory, saves the
//! same again, and runs to the same end with the same console output as the original.

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use carve_guest_images::{path, Format};
use carve_snapshot::Persist;
use carve_vmm::kvm_state::TimePolicy;
use carve_vmm::snapshot::{RestoreConfig, RestoreMemory, VmRestore, VmSnapshot};
use carve_vmm::{KernelSpec, SerialSink, Vm, VmConfig, VmExit};

fn kvm_usable(test: &str) -> bool {
    let usable = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok();
    if !usable {
        eprintln!("SKIPPED {test}: /dev/kvm is not usable here");
    }
    usable
}

/// Console output the test reads back.
#[derive(Clone, Default)]
struct Console(Arc<Mutex<Vec<u8>>>);

impl Write for Console {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Console {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// An empty directory of this test's own, removed when dropped.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn a_vm_saved_before_it_runs_restores_saves_the_same_and_runs_the_same() {
    if !kvm_usable("a_vm_saved_before_it_runs_restores_saves_the_same_and_runs_the_same") {
        return;
    }
    let dir = TempDir(std::env::temp_dir().join(format!("carve-vm-persist-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&dir.0);
    std::fs::create_dir_all(&dir.0).unwrap();
    let snapshot_dir = dir.0.join("snapshot");

    let original_console = Console::default();
    let mut config = VmConfig::new(KernelSpec::Path(path("exit", Format::Pvh)));
    config.cmdline = "mode=code:3".into();
    config.vcpus = 2;
    config.serial = SerialSink::Writer(Box::new(original_console.clone()));
    let original = Vm::build(config, Vec::new()).unwrap();
    let saved = original.save().unwrap();
    assert_eq!(saved.kvm.vcpus.len(), 2);
    original.save_to(&snapshot_dir).unwrap();

    let read = VmSnapshot::read(&snapshot_dir).unwrap();
    let restored_console = Console::default();
    let config = RestoreConfig {
        serial: SerialSink::Writer(Box::new(restored_console.clone())),
        serial_input: false,
        vsock: None,
        nsm_ca: None,
        time: TimePolicy::Frozen,
    };
    let restored = <Vm as Persist>::restore(
        VmRestore { memory: RestoreMemory::Dir(snapshot_dir.clone()), config },
        &read,
    )
    .unwrap();

    // Saved again before it runs: the same registers and devices (time-driven state aside).
    let again = restored.save().unwrap();
    for (vcpu, (before, after)) in saved.kvm.vcpus.iter().zip(&again.kvm.vcpus).enumerate() {
        assert_eq!(before.regs, after.regs, "vCPU {vcpu}'s registers");
        assert_eq!(before.cpuid, after.cpuid, "vCPU {vcpu}'s CPUID");
        assert_eq!(before.mp_state, after.mp_state, "vCPU {vcpu}'s MP state");
    }
    let encoded = |state: &VmSnapshot| carve_snapshot::file::encode(&state.devices).unwrap();
    assert_eq!(encoded(&again), encoded(&saved), "the devices save the same");
    assert_eq!(again.memory, saved.memory);

    let ended = original.run().unwrap().exit;
    assert!(matches!(ended, VmExit::DebugExit(3)), "{ended}");
    let restored_ended = restored.run().unwrap().exit;
    assert!(matches!(restored_ended, VmExit::DebugExit(3)), "{restored_ended}");
    assert!(original_console.text().contains("exit mode: code:3"), "{}", original_console.text());
    assert_eq!(restored_console.text(), original_console.text());
}
