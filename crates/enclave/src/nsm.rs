//! An enclave's Nitro Secure Module, assembled once for every way carve boots an enclave image
//! (`run-enclave` and `carve vm run --eif`): the image PCRs the VMM measured while loading the
//! image, the parent's identity (PCR3/PCR4), debug mode, and the local CA that signs for it.

use carve_nsm::pcr::{BootMeasurements, ParentIdentity};
use carve_nsm::pki::CertificateAuthority;
use carve_vmm::{BootedImage, ExtraDevice, VirtioKind, VirtioParts};

/// The NSM to attach: who the VM is, who launched it, and the CA that signs for it.
pub struct EnclaveNsm {
    /// The enclave ID, reported as `module_id` and the leaf certificate's CN.
    pub module_id: String,
    pub parent: ParentIdentity,
    /// Debug-mode enclaves report their image PCRs as zeros: their console can leak secrets.
    pub debug_mode: bool,
    pub ca: CertificateAuthority,
}

impl ExtraDevice for EnclaveNsm {
    fn kind(&self) -> VirtioKind {
        VirtioKind::Nsm
    }

    fn build(self: Box<Self>, image: &BootedImage<'_>) -> Result<VirtioParts, String> {
        let measurements = BootMeasurements {
            image: image.measurements.cloned(),
            parent: self.parent,
            debug_mode: self.debug_mode,
        };
        let nsm = carve_nsm::Nsm::new(self.module_id, &measurements, self.ca)
            .map_err(|e| format!("cannot give the NSM a signing identity: {e}"))?;
        let (device, backend) =
            carve_virtio::nsm::NsmDevice::new(nsm, image.mem.clone()).map_err(|e| e.to_string())?;
        Ok(VirtioParts::Nsm(device, Box::new(backend)))
    }
}
