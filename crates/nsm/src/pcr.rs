//! The NSM's bank of 32 SHA-384 platform configuration registers.
//!
//! PCRs 0–15 belong to the platform: they are set at boot (image measurements, parent identity)
//! and locked. PCRs 16–31 start at zero and are the enclave's to extend and lock.

use carve_eif::measure::extend_zero;
use carve_eif::Measurements;
use carve_snapshot::Persist;
use sha2::{Digest, Sha384};

use crate::state::{pcr_value, BootState, ImageState, NsmStateError, PcrBankState, PcrState, DIGEST};

pub const PCR_COUNT: usize = 32;
pub const PCR_LEN: usize = 48;
/// PCRs below this index are locked from boot.
pub const PLATFORM_PCRS: usize = 16;

pub type PcrValue = [u8; PCR_LEN];

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PcrError {
    #[error("PCR {0} does not exist; the bank has {PCR_COUNT}")]
    InvalidIndex(u64),
    #[error("PCR {0} is locked")]
    ReadOnly(usize),
}

/// Who launched the enclave: strings measured into PCR3 (the parent's role) and PCR4 (the parent
/// instance's ID), each as `SHA-384(48 zero bytes ‖ UTF-8 string)`. Nitro measures the IAM role ARN and the EC2 instance ID; carve measures
/// whatever identity the launcher states.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ParentIdentity {
    pub role: Option<String>,
    pub instance_id: Option<String>,
}

impl ParentIdentity {
    /// PCR3 and PCR4 for the identity stated (a register left out stays zero).
    pub fn pcrs(&self) -> impl Iterator<Item = (usize, PcrValue)> + '_ {
        [(3, &self.role), (4, &self.instance_id)]
            .into_iter()
            .filter_map(|(index, text)| text.as_ref().map(|text| (index, extend_zero(text.as_bytes()))))
    }
}

/// What the bank holds at boot.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BootMeasurements {
    /// The enclave image's PCR0/1/2/8; `None` for a VM started without an EIF.
    pub image: Option<Measurements>,
    pub parent: ParentIdentity,
    /// Debug-mode enclaves report the image PCRs as zeros: their console can leak secrets.
    pub debug_mode: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PcrBank {
    values: [PcrValue; PCR_COUNT],
    locked: u32,
}

impl PcrBank {
    pub fn new(boot: &BootMeasurements) -> PcrBank {
        let mut values = [[0u8; PCR_LEN]; PCR_COUNT];
        if let (Some(image), false) = (&boot.image, boot.debug_mode) {
            values[0] = image.pcr0;
            values[1] = image.pcr1;
            values[2] = image.pcr2;
            if let Some(pcr8) = image.pcr8 {
                values[8] = pcr8;
            }
        }
        for (index, value) in boot.parent.pcrs() {
            values[index] = value;
        }
        PcrBank { values, locked: (1 << PLATFORM_PCRS) - 1 }
    }

    fn index(index: u64) -> Result<usize, PcrError> {
        if index < PCR_COUNT as u64 {
            Ok(index as usize)
        } else {
            Err(PcrError::InvalidIndex(index))
        }
    }

    /// The value of PCR `index` and whether it is locked.
    pub fn describe(&self, index: u64) -> Result<(bool, PcrValue), PcrError> {
        let index = Self::index(index)?;
        Ok((self.is_locked(index), self.values[index]))
    }

    pub fn is_locked(&self, index: usize) -> bool {
        self.locked & (1 << index) != 0
    }

    /// `PCR = SHA-384(PCR ‖ data)`; returns the new value.
    pub fn extend(&mut self, index: u64, data: &[u8]) -> Result<PcrValue, PcrError> {
        let index = Self::index(index)?;
        if self.is_locked(index) {
            return Err(PcrError::ReadOnly(index));
        }
        let mut hasher = Sha384::new();
        hasher.update(self.values[index]);
        hasher.update(data);
        self.values[index] = hasher.finalize().into();
        Ok(self.values[index])
    }

    pub fn lock(&mut self, index: u64) -> Result<(), PcrError> {
        let index = Self::index(index)?;
        if self.is_locked(index) {
            return Err(PcrError::ReadOnly(index));
        }
        self.locked |= 1 << index;
        Ok(())
    }

    /// Locks PCRs `0..range` (those already locked stay so).
    pub fn lock_range(&mut self, range: u64) -> Result<(), PcrError> {
        if range > PCR_COUNT as u64 {
            return Err(PcrError::InvalidIndex(range));
        }
        self.locked |= ((1u64 << range) - 1) as u32;
        Ok(())
    }

    /// Indices of the locked PCRs, ascending.
    pub fn locked(&self) -> Vec<u16> {
        (0..PCR_COUNT as u16).filter(|&i| self.is_locked(i.into())).collect()
    }

    /// The platform PCRs as an attestation document carries them.
    pub fn platform_pcrs(&self) -> impl Iterator<Item = (usize, &PcrValue)> {
        self.values.iter().enumerate().take(PLATFORM_PCRS)
    }
}

impl BootMeasurements {
    /// As saved.
    pub fn save(&self) -> BootState {
        BootState {
            image: self.image.as_ref().map(|image| ImageState {
                pcr0: image.pcr0.to_vec(),
                pcr1: image.pcr1.to_vec(),
                pcr2: image.pcr2.to_vec(),
                pcr8: image.pcr8.map(|pcr8| pcr8.to_vec()),
            }),
            parent_role: self.parent.role.clone(),
            parent_instance_id: self.parent.instance_id.clone(),
            debug_mode: self.debug_mode,
        }
    }

    /// From a saved state, every measurement checked to be a SHA-384 value.
    pub fn restore(state: &BootState) -> Result<BootMeasurements, NsmStateError> {
        let value = |name: &'static str, bytes: &[u8]| {
            pcr_value(bytes).ok_or(NsmStateError::MeasurementLength { name, len: bytes.len() })
        };
        let image = match &state.image {
            Some(image) => Some(Measurements {
                pcr0: value("PCR0", &image.pcr0)?,
                pcr1: value("PCR1", &image.pcr1)?,
                pcr2: value("PCR2", &image.pcr2)?,
                pcr8: image.pcr8.as_deref().map(|pcr8| value("PCR8", pcr8)).transpose()?,
            }),
            None => None,
        };
        Ok(BootMeasurements {
            image,
            parent: ParentIdentity {
                role: state.parent_role.clone(),
                instance_id: state.parent_instance_id.clone(),
            },
            debug_mode: state.debug_mode,
        })
    }
}

impl PcrBank {
    /// Whether the platform PCRs hold what `boot` gives them; the first that does not, if any.
    pub(crate) fn check_boot(&self, boot: &BootMeasurements) -> Result<(), NsmStateError> {
        let fresh = PcrBank::new(boot);
        match (0..PLATFORM_PCRS).find(|&i| self.values[i] != fresh.values[i]) {
            Some(index) => Err(NsmStateError::BootMismatch(index)),
            None => Ok(()),
        }
    }
}

/// The bank's values and locks survive exactly; a restored bank is checked as
/// [`crate::state`] describes (the boot measurements are checked by [`crate::Nsm`]'s restore).
impl Persist for PcrBank {
    type State = PcrBankState;
    type ConstructorArgs = ();
    type Error = NsmStateError;

    fn save(&self) -> Result<PcrBankState, NsmStateError> {
        Ok(PcrBankState {
            digest: DIGEST.into(),
            pcrs: (0..PCR_COUNT)
                .map(|index| PcrState { index: index as u64, value: self.values[index].to_vec() })
                .collect(),
            locked: self.locked.into(),
        })
    }

    fn restore(_: (), state: &PcrBankState) -> Result<PcrBank, NsmStateError> {
        if state.digest != DIGEST {
            return Err(NsmStateError::Digest(state.digest.clone()));
        }
        let mut values: [Option<PcrValue>; PCR_COUNT] = [None; PCR_COUNT];
        for pcr in &state.pcrs {
            let index = PcrBank::index(pcr.index).map_err(|_| NsmStateError::IndexOutOfRange(pcr.index))?;
            let value = pcr_value(&pcr.value)
                .ok_or(NsmStateError::ValueLength { index: pcr.index, len: pcr.value.len() })?;
            if values[index].replace(value).is_some() {
                return Err(NsmStateError::DuplicateIndex(pcr.index));
            }
        }
        let mut bank = PcrBank { values: [[0; PCR_LEN]; PCR_COUNT], locked: 0 };
        for (index, value) in values.into_iter().enumerate() {
            bank.values[index] = value.ok_or(NsmStateError::MissingIndex(index))?;
        }
        bank.locked = u32::try_from(state.locked).map_err(|_| NsmStateError::LockOutOfRange(state.locked))?;
        if let Some(index) = (0..PLATFORM_PCRS).find(|&i| !bank.is_locked(i)) {
            return Err(NsmStateError::PlatformUnlocked(index));
        }
        Ok(bank)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> Measurements {
        Measurements { pcr0: [1; 48], pcr1: [2; 48], pcr2: [3; 48], pcr8: Some([8; 48]) }
    }

    fn sha384(parts: &[&[u8]]) -> PcrValue {
        let mut hasher = Sha384::new();
        parts.iter().for_each(|p| hasher.update(p));
        hasher.finalize().into()
    }

    #[test]
    fn boot_values_come_from_the_image_and_the_parent() {
        let parent =
            ParentIdentity { role: Some("arn:aws:iam::1:role/r".into()), instance_id: Some("i-1".into()) };
        let bank = PcrBank::new(&BootMeasurements { image: Some(image()), parent, debug_mode: false });
        assert_eq!(bank.describe(0).unwrap(), (true, [1; 48]));
        assert_eq!(bank.describe(1).unwrap().1, [2; 48]);
        assert_eq!(bank.describe(2).unwrap().1, [3; 48]);
        assert_eq!(bank.describe(8).unwrap().1, [8; 48]);
        // One extend of a zero register with the string itself, as AWS documents for PCR3.
        assert_eq!(bank.describe(3).unwrap().1, sha384(&[&[0; 48], b"arn:aws:iam::1:role/r"]));
        assert_eq!(bank.describe(4).unwrap().1, sha384(&[&[0; 48], b"i-1"]));
        assert_eq!(bank.describe(5).unwrap(), (true, [0; 48]));
        assert_eq!(bank.describe(16).unwrap(), (false, [0; 48]));
        assert_eq!(bank.locked(), (0..16).collect::<Vec<u16>>());
    }

    #[test]
    fn parent_pcrs_match_the_values_aws_documents() {
        let parent = ParentIdentity {
            role: Some("arn:aws:iam::123456789012:role/Webserver".into()),
            instance_id: Some("i-1234567890abcdef0".into()),
        };
        let hex = |v: PcrValue| v.iter().map(|b| format!("{b:02x}")).collect::<String>();
        let pcrs: Vec<(usize, String)> = parent.pcrs().map(|(i, v)| (i, hex(v))).collect();
        assert_eq!(
            pcrs,
            [
                (3, "78fce75db17cd4e0a3fb8dad3ad128ca5e77edbb2b2c7f75329dccd99aa5f6ef4fc1f1a452e315b9e98f9e312e6921e6".into()),
                (4, "08f996b5d43e047a9eb51e7f548bfee7e164fd7dc8f65541f2ac09d6545ac812719327281c401a67a10fcba87ae79ce0".into()),
            ]
        );
    }

    #[test]
    fn debug_mode_zeroes_the_image_pcrs_but_not_the_parent_ones() {
        let parent = ParentIdentity { role: None, instance_id: Some("i-1".into()) };
        let bank = PcrBank::new(&BootMeasurements { image: Some(image()), parent, debug_mode: true });
        for index in [0, 1, 2, 8, 3] {
            assert_eq!(bank.describe(index).unwrap().1, [0; 48], "PCR{index}");
        }
        assert_ne!(bank.describe(4).unwrap().1, [0; 48]);
    }

    #[test]
    fn extend_hashes_the_old_value_with_the_data_and_lock_freezes_it() {
        let mut bank = PcrBank::new(&BootMeasurements::default());
        let first = bank.extend(16, b"abc").unwrap();
        assert_eq!(first, sha384(&[&[0; 48], b"abc"]));
        assert_eq!(bank.extend(16, b"").unwrap(), sha384(&[&first]));
        bank.lock(16).unwrap();
        assert_eq!(bank.extend(16, b"x"), Err(PcrError::ReadOnly(16)));
        assert_eq!(bank.lock(16), Err(PcrError::ReadOnly(16)));
        assert_eq!(bank.extend(3, b"x"), Err(PcrError::ReadOnly(3)));
        assert_eq!(bank.extend(32, b"x"), Err(PcrError::InvalidIndex(32)));
        assert_eq!(bank.describe(u64::MAX), Err(PcrError::InvalidIndex(u64::MAX)));
    }

    #[test]
    fn lock_range_locks_a_prefix_and_refuses_past_the_bank() {
        let mut bank = PcrBank::new(&BootMeasurements::default());
        bank.lock_range(20).unwrap();
        assert_eq!(bank.locked(), (0..20).collect::<Vec<u16>>());
        bank.lock_range(32).unwrap();
        assert_eq!(bank.locked().len(), 32);
        assert_eq!(bank.lock_range(33), Err(PcrError::InvalidIndex(33)));
    }

    #[test]
    fn a_saved_bank_restores_exactly() {
        let mut bank = PcrBank::new(&BootMeasurements { image: Some(image()), ..Default::default() });
        bank.extend(16, b"abc").unwrap();
        bank.extend(31, b"xyz").unwrap();
        bank.lock(16).unwrap();
        let state = bank.save().unwrap();
        let mut restored = PcrBank::restore((), &state).unwrap();
        assert_eq!(restored, bank);
        assert_eq!(restored.save().unwrap(), state);
        assert_eq!(restored.extend(16, b"x"), Err(PcrError::ReadOnly(16)));
    }

    #[test]
    fn malformed_banks_are_refused_with_one_sentence() {
        let good = PcrBank::new(&BootMeasurements::default()).save().unwrap();
        let refused = |change: &dyn Fn(&mut PcrBankState)| {
            let mut state = good.clone();
            change(&mut state);
            PcrBank::restore((), &state).unwrap_err().to_string()
        };
        assert_eq!(
            refused(&|s| s.pcrs[20].index = 40),
            "the saved PCR bank has PCR index 40, out of range for a bank of 32"
        );
        assert_eq!(refused(&|s| s.pcrs[20].index = 21), "the saved PCR bank has PCR 21 more than once");
        assert_eq!(refused(&|s| drop(s.pcrs.pop())), "the saved PCR bank lacks PCR 31");
        assert_eq!(
            refused(&|s| s.pcrs[17].value.push(0)),
            "the saved PCR 17 holds 49 bytes, but SHA384 values are 48"
        );
        assert_eq!(
            refused(&|s| s.locked |= 1 << 32),
            "the saved lock bitmap 0x10000ffff locks registers beyond the 32 the bank has"
        );
        assert_eq!(
            refused(&|s| s.locked &= !(1 << 3)),
            "the saved PCR bank leaves platform PCR 3 unlocked, which the platform locks at boot"
        );
        assert_eq!(
            refused(&|s| s.digest = "SHA256".into()),
            "the saved PCR bank uses the digest \"SHA256\", but carve's NSM uses SHA384"
        );
    }
}
