//! Enclaves carved out of the host, as Nitro carves them out of an EC2 instance: the
//! run-enclave arguments and their rules ([`args`]), the daemonised enclave process that holds
//! each enclave's VM ([`process`]) and the CLI's side of talking to it ([`client`], over
//! [`protocol`]), the run directory of sockets and records ([`run_dir`]), the CPU pool and
//! hugepages ([`pool`]), the boot heartbeat ([`heartbeat`]), the app's exit status from carve's
//! init ([`app_exit`]), the console ring ([`console`]) and AWS's vsock-proxy for every
//! enclave ([`vsock_proxy`]).

pub mod app_exit;
pub mod args;
pub mod client;
pub mod console;
pub mod error;
pub mod heartbeat;
pub mod ids;
pub mod nsm;
pub mod pool;
pub mod process;
pub mod protocol;
pub mod run_dir;
pub mod vsock_proxy;

pub use error::{ErrorCode, Failure};
