//! The Nitro Secure Module as carve provides it: the PCR bank, the CBOR request protocol of
//! aws-nitro-enclaves-nsm-api, signed attestation documents, the local CA that signs them and a
//! verifier that follows AWS's published process. No VMM dependency: the virtio-nsm device in
//! carve-virtio carries requests to [`Nsm::handle`].

pub mod document;
pub mod pcr;
pub mod pki;
pub mod protocol;
pub mod state;
pub mod verify;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use carve_snapshot::Persist;
use rand_core::{OsRng, RngCore};

use document::AttestationDoc;
use pcr::{BootMeasurements, PcrBank, PcrError, PCR_COUNT};
use pki::{CertificateAuthority, Leaf, PkiError};
use protocol::{ErrorCode, NsmDescription, Request, Response};
use state::{NsmState, NsmStateError, MAX_MODULE_ID};

/// GetRandom's answer size (as QEMU's NSM).
pub const RANDOM_BYTES: usize = 256;
/// A leaf with less than this left is replaced before it signs.
const LEAF_RENEWAL: Duration = Duration::from_secs(3600);

/// One VM's NSM: its PCRs and its signing identity.
pub struct Nsm {
    module_id: String,
    /// What the platform PCRs were set from; kept so that a snapshot carries it.
    boot: BootMeasurements,
    bank: PcrBank,
    ca: CertificateAuthority,
    leaf: Leaf,
}

impl Nsm {
    /// An NSM for the enclave `module_id`, with a fresh leaf from `ca`.
    pub fn new(
        module_id: String,
        boot: &BootMeasurements,
        ca: CertificateAuthority,
    ) -> Result<Nsm, PkiError> {
        let leaf = ca.issue_leaf(&module_id, SystemTime::now())?;
        Ok(Nsm { module_id, boot: boot.clone(), bank: PcrBank::new(boot), ca, leaf })
    }

    pub fn module_id(&self) -> &str {
        &self.module_id
    }

    pub fn pcrs(&self) -> &PcrBank {
        &self.bank
    }

    pub fn boot_measurements(&self) -> &BootMeasurements {
        &self.boot
    }

    /// Answers one request's bytes with the response's bytes. Never fails: every problem with
    /// the request is an `{"Error": code}` response.
    pub fn handle(&mut self, request: &[u8]) -> Vec<u8> {
        let response = match Request::decode(request) {
            Ok(request) => self.respond(request),
            Err(code) => Response::Error(code),
        };
        response.encode()
    }

    pub fn respond(&mut self, request: Request) -> Response {
        match self.execute(request) {
            Ok(response) => response,
            Err(code) => Response::Error(code),
        }
    }

    fn execute(&mut self, request: Request) -> Result<Response, ErrorCode> {
        Ok(match request {
            Request::DescribePcr { index } => {
                let (lock, data) = self.bank.describe(index).map_err(pcr_error)?;
                Response::DescribePcr { lock, data: data.to_vec() }
            }
            Request::ExtendPcr { index, data } => {
                Response::ExtendPcr { data: self.bank.extend(index, &data).map_err(pcr_error)?.to_vec() }
            }
            Request::LockPcr { index } => {
                self.bank.lock(index).map_err(pcr_error)?;
                Response::LockPcr
            }
            Request::LockPcrs { range } => {
                self.bank.lock_range(range).map_err(pcr_error)?;
                Response::LockPcrs
            }
            Request::DescribeNsm => Response::DescribeNsm(NsmDescription {
                version_major: 1,
                version_minor: 0,
                version_patch: 0,
                module_id: self.module_id.clone(),
                max_pcrs: PCR_COUNT as u16,
                locked_pcrs: self.bank.locked(),
            }),
            Request::Attestation { user_data, nonce, public_key } => {
                let too_large = |field: &Option<Vec<u8>>, max| field.as_ref().is_some_and(|f| f.len() > max);
                if too_large(&user_data, document::MAX_USER_DATA)
                    || too_large(&nonce, document::MAX_NONCE)
                    || too_large(&public_key, document::MAX_PUBLIC_KEY)
                {
                    return Err(ErrorCode::InputTooLarge);
                }
                if public_key.as_ref().is_some_and(Vec::is_empty) {
                    return Err(ErrorCode::InvalidArgument);
                }
                Response::Attestation { document: self.attest(user_data, nonce, public_key)? }
            }
            Request::GetRandom => {
                let mut random = vec![0u8; RANDOM_BYTES];
                OsRng.fill_bytes(&mut random);
                Response::GetRandom { random }
            }
        })
    }

    fn attest(
        &mut self,
        user_data: Option<Vec<u8>>,
        nonce: Option<Vec<u8>>,
        public_key: Option<Vec<u8>>,
    ) -> Result<Vec<u8>, ErrorCode> {
        let now = SystemTime::now();
        if self.leaf.not_after < now + LEAF_RENEWAL {
            self.leaf = self.ca.issue_leaf(&self.module_id, now).map_err(|_| ErrorCode::InternalError)?;
        }
        let timestamp =
            now.duration_since(UNIX_EPOCH).map_err(|_| ErrorCode::InternalError)?.as_millis() as u64;
        let doc = AttestationDoc {
            module_id: self.module_id.clone(),
            digest: "SHA384".into(),
            timestamp,
            pcrs: self.bank.platform_pcrs().map(|(i, v)| (i as u64, v.to_vec())).collect(),
            certificate: self.leaf.certificate.clone(),
            cabundle: self.leaf.cabundle.clone(),
            public_key,
            user_data,
            nonce,
        };
        Ok(doc.sign(&self.leaf.key))
    }
}

/// The module's identity and PCR bank survive exactly; the signing leaf is issued afresh by the
/// CA given to `restore` (see [`state`]).
impl Persist for Nsm {
    type State = NsmState;
    type ConstructorArgs = CertificateAuthority;
    type Error = NsmStateError;

    fn save(&self) -> Result<NsmState, NsmStateError> {
        Ok(NsmState { module_id: self.module_id.clone(), boot: self.boot.save(), bank: self.bank.save()? })
    }

    fn restore(ca: CertificateAuthority, state: &NsmState) -> Result<Nsm, NsmStateError> {
        if state.module_id.is_empty() || state.module_id.len() > MAX_MODULE_ID {
            return Err(NsmStateError::ModuleId);
        }
        let boot = BootMeasurements::restore(&state.boot)?;
        let bank = PcrBank::restore((), &state.bank)?;
        bank.check_boot(&boot)?;
        let leaf = ca.issue_leaf(&state.module_id, SystemTime::now())?;
        Ok(Nsm { module_id: state.module_id.clone(), boot, bank, ca, leaf })
    }
}

fn pcr_error(error: PcrError) -> ErrorCode {
    match error {
        PcrError::InvalidIndex(_) => ErrorCode::InvalidIndex,
        PcrError::ReadOnly(_) => ErrorCode::ReadOnlyIndex,
    }
}
