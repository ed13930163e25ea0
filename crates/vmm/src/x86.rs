//! Architectural bits of x86 control registers, EFER and RFLAGS (SDM Vol. 3A §2.5, §2.2.1).

pub const CR0_PE: u64 = 1;
pub const CR0_ET: u64 = 1 << 4;
pub const CR0_WP: u64 = 1 << 16;
pub const CR0_NW: u64 = 1 << 29;
pub const CR0_CD: u64 = 1 << 30;
pub const CR0_PG: u64 = 1 << 31;
pub const CR4_PAE: u64 = 1 << 5;
pub const CR4_PCIDE: u64 = 1 << 17;
pub const CR4_CET: u64 = 1 << 23;
pub const EFER_SCE: u64 = 1;
pub const EFER_LME: u64 = 1 << 8;
pub const EFER_LMA: u64 = 1 << 10;
pub const EFER_NXE: u64 = 1 << 11;
/// SVME, LMSLE, FFXSR, TCE and AutoIBRS exist only on AMD.
pub const EFER_AMD_ONLY: u64 = (0xf << 12) | (1 << 21);
/// RFLAGS bit 1 always reads as one.
pub const RFLAGS_FIXED_1: u64 = 1 << 1;
pub const RFLAGS_TF: u64 = 1 << 8;
pub const RFLAGS_IF: u64 = 1 << 9;
pub const RFLAGS_NT: u64 = 1 << 14;
pub const RFLAGS_RF: u64 = 1 << 16;
pub const RFLAGS_RESERVED: u64 = !((1 << 22) - 1) | (1 << 15) | (1 << 5) | (1 << 3);
pub const RFLAGS_VM: u64 = 1 << 17;
