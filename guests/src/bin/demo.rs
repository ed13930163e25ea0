//! carve's demo guest (and demo enclave): says what it booted with; with a vsock device it sends
//! Nitro's boot heartbeat to the parent's port 9000, serves echo on port 5005 and, with an NSM,
//! attestation on port 5006 (a u32 big-endian length and that many nonce bytes in; a u32
//! big-endian length and the attestation document out). A connection to port 5007 tells it to
//! stop; so does `echo_sessions=N` on the command line after N sessions of either kind. Either
//! way it powers off cleanly. With `connect_out=P` it first connects to the parent's port P (as
//! an app reaching a vsock-proxy does), sends one line, and prints what comes back.
#![no_std]
#![no_main]

use carve_guests::interrupts;
use carve_guests::nsm::{attestation_request, response_bytes, Nsm, DEVICE_ID as NSM_ID};
use carve_guests::virtio::find_device_of_type;
use carve_guests::vsock::{echo_step, heartbeat, serve_with_idle, ConnId, State, Vsock, MAX_PAYLOAD};
use carve_guests::{fw_cfg, guest_main, param, parse_u64, println, BootInfo};

guest_main!(main);

const DMA: u64 = 0x0200_0000;
const ECHO_PORT: u32 = 5005;
const ATTESTATION_PORT: u32 = 5006;
const SHUTDOWN_PORT: u32 = 5007;
const IDLE_TICK_US: u32 = 200_000;
const MAX_NONCE: usize = 512;
const VSOCK_ID: u32 = 19;

fn main(boot: &BootInfo) -> ! {
    println!("Hello from the carve demo guest!");
    println!("  boot protocol: {}", boot.protocol.name());
    println!("  command line:  {}", boot.cmdline);
    println!("  memory:        {} MiB usable of {} MiB", boot.usable_bytes() >> 20, boot.ram_end() >> 20);
    println!("  vCPUs:         {}", fw_cfg::read_u16(fw_cfg::NB_CPUS));
    for module in boot.modules() {
        println!("  module:        {} bytes at {:#x}", module.size, module.base);
    }
    let mut nsm = find_device_of_type(boot.cmdline, NSM_ID).and_then(|device| match Nsm::new(device, DMA) {
        Ok(nsm) => Some(nsm),
        Err(e) => {
            println!("  nsm:           unusable: {}", e);
            None
        }
    });
    if let Some(device) = find_device_of_type(boot.cmdline, VSOCK_ID) {
        match Vsock::new(device, DMA + Nsm::dma_size()) {
            Ok(mut vsock) => {
                let limit = param(boot.cmdline, "echo_sessions").and_then(parse_u64).map(|n| n as u32);
                println!(
                    "  vsock:         CID {}, echo on port {}, stop on port {}",
                    vsock.cid, ECHO_PORT, SHUTDOWN_PORT
                );
                vsock.listen(ECHO_PORT);
                vsock.listen(SHUTDOWN_PORT);
                if nsm.is_some() {
                    println!("  nsm:           attestation on port {}", ATTESTATION_PORT);
                    vsock.listen(ATTESTATION_PORT);
                }
                if let Some(port) = param(boot.cmdline, "connect_out").and_then(parse_u64) {
                    connect_out(&mut vsock, port as u32);
                }
                // Listening first: once the parent has the heartbeat, the services are up.
                match heartbeat(&mut vsock) {
                    Ok(()) => println!("  heartbeat:     acknowledged by the parent"),
                    Err(e) => println!("  heartbeat:     none ({})", e),
                }
                let mut scratch = [0u8; MAX_PAYLOAD as usize];
                let mut attestation = Attestation::new();
                // Between requests the vCPU sleeps until the device interrupts (or a tick).
                interrupts::start_ticks(IDLE_TICK_US);
                interrupts::route_pin(vsock.irq(), interrupts::FIRST_VECTOR + 1);
                let served = serve_with_idle(
                    &mut vsock,
                    limit,
                    |vsock, conn| vsock.local_port(conn) == SHUTDOWN_PORT,
                    |vsock, conn| {
                        if vsock.local_port(conn) == ATTESTATION_PORT {
                            match nsm.as_mut() {
                                Some(nsm) => attestation.step(vsock, conn, nsm),
                                None => false,
                            }
                        } else {
                            echo_step(vsock, conn, &mut scratch)
                        }
                    },
                    interrupts::idle,
                );
                println!("  served {} sessions", served);
            }
            Err(e) => println!("  vsock:         unusable: {}", e),
        }
    }
    println!("Demo guest done; powering off.");
    carve_guests::reset()
}

/// Sends a greeting to the parent's `port` and prints the answer, up to 200 bytes, once the
/// parent closes (or the buffer is full).
fn connect_out(vsock: &mut Vsock, port: u32) {
    let Some(conn) = vsock.connect(port) else {
        println!("  connect out:   no free connection");
        return;
    };
    let greeting = b"hello from the enclave\n";
    let (mut sent, mut answer, mut got) = (0, [0u8; 200], 0);
    loop {
        vsock.poll(|_| {});
        match vsock.state(conn) {
            State::Connecting => continue,
            State::Established => {}
            _ if got == 0 => {
                println!("  connect out:   port {} refused or closed without answering", port);
                vsock.release(conn);
                return;
            }
            _ => break,
        }
        if sent < greeting.len() {
            sent += vsock.send(conn, &greeting[sent..]);
        }
        got += vsock.recv(conn, &mut answer[got..]);
        if got == answer.len() || vsock.peer_closed(conn) {
            break;
        }
    }
    vsock.close(conn);
    let text = core::str::from_utf8(&answer[..got]).unwrap_or("(not UTF-8)");
    println!("  connect out:   port {} answered: {}", port, text.trim_end());
}

/// The attestation service, one connection at a time: the current connection's request is
/// collected, the NSM asked, and the document (which stays in the NSM's response buffer until
/// the next request) sent. Other connections wait with their bytes in the vsock receive ring.
struct Attestation {
    current: Option<ConnId>,
    /// The length prefix and nonce received so far.
    received: [u8; 4 + MAX_NONCE],
    filled: usize,
    /// The document being sent, and how much of it has gone.
    reply: Option<(&'static [u8], usize)>,
}

impl Attestation {
    fn new() -> Attestation {
        Attestation { current: None, received: [0; 4 + MAX_NONCE], filled: 0, reply: None }
    }

    /// Advances `conn`; false once it is closed.
    fn step(&mut self, vsock: &mut Vsock, conn: ConnId, nsm: &mut Nsm) -> bool {
        match vsock.state(conn) {
            State::Established => {}
            State::Reset => {
                println!("  attestation:   the peer reset the connection");
                self.finish(vsock, conn);
                return false;
            }
            _ => return false,
        }
        if *self.current.get_or_insert(conn) != conn {
            return true;
        }
        if let Some((reply, sent)) = self.reply {
            let sent = sent + vsock.send(conn, &reply[sent..]);
            if sent == reply.len() {
                self.finish(vsock, conn);
                return false;
            }
            self.reply = Some((reply, sent));
            return true;
        }
        let want = match self.filled {
            0..=3 => 4,
            _ => 4 + u32::from_be_bytes(self.received[..4].try_into().unwrap()) as usize,
        };
        if !(4..=4 + MAX_NONCE).contains(&want) || (self.filled >= 4 && want == 4) {
            println!("  attestation:   nonce of {} bytes refused (1 to {})", want - 4, MAX_NONCE);
            self.finish(vsock, conn);
            return false;
        }
        let got = vsock.recv(conn, &mut self.received[self.filled..want]);
        self.filled += got;
        if self.filled == want && want > 4 {
            let mut request = [0u8; 64 + MAX_NONCE];
            let len = attestation_request(&mut request, Some(b"carve-demo"), Some(&self.received[4..want]));
            match response_bytes(nsm.call(&request[..len]), "Attestation", "document") {
                Ok(document) if vsock.send(conn, &(document.len() as u32).to_be_bytes()) == 4 => {
                    self.reply = Some((document, 0));
                }
                Ok(_) => {
                    println!("  attestation:   no credit for the reply");
                    self.finish(vsock, conn);
                    return false;
                }
                Err(e) => {
                    println!("  attestation:   NSM error {}", e);
                    self.finish(vsock, conn);
                    return false;
                }
            }
        } else if got == 0 && vsock.peer_closed(conn) {
            println!("  attestation:   the peer closed after {} of {} bytes", self.filled, want);
            self.finish(vsock, conn);
            return false;
        }
        true
    }

    fn finish(&mut self, vsock: &mut Vsock, conn: ConnId) {
        if self.current == Some(conn) {
            *self = Attestation::new();
        }
        if vsock.state(conn) == State::Reset {
            vsock.release(conn);
        } else {
            vsock.close(conn);
        }
    }
}
