//! The 8250 UART on COM1 (vm-superio), raising its IRQ through a legacy interrupt line.

use std::io::Write;

use carve_snapshot::Persist;
use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::Serial;

use super::BusDevice;
use crate::interrupts::LegacyLine;

pub const COM1_BASE: u64 = 0x3f8;
pub const COM1_LEN: u64 = 8;

pub type SerialOutput = Box<dyn Write + Send>;

/// The receive FIFO of a 16550A, as vm-superio models it.
pub const FIFO_SIZE: usize = 64;
/// The interrupt enable bits a 16550A has (vm-superio keeps no others).
const IER_VALID: u8 = 0x0f;
/// Interrupt identification: none pending, or THR empty and received data alone or together.
const IIR_VALUES: [u8; 4] = [0x01, 0x02, 0x04, 0x06];
/// Line status: vm-superio's transmitter is always empty and idle; data ready while the FIFO
/// holds bytes.
const LSR_IDLE: u8 = 0x60;
const LSR_DATA_READY: u8 = 0x01;

pub struct SerialPort {
    uart: Serial<LegacyLine, NoEvents, SerialOutput>,
}

impl SerialPort {
    pub fn new(irq: LegacyLine, output: SerialOutput) -> SerialPort {
        SerialPort { uart: Serial::new(irq, output) }
    }

    /// Queues console input for the guest; returns how many bytes fit in the FIFO.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        self.uart.enqueue_raw_bytes(bytes).unwrap_or(0)
    }

    pub fn flush(&mut self) {
        let _ = self.uart.writer_mut().flush();
    }
}

impl BusDevice for SerialPort {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        data.fill(0);
        data[0] = self.uart.read(offset as u8);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        // A failed write to the output sink loses console text, never the VM.
        let _ = self.uart.write(offset as u8, data[0]);
    }
}

/// The UART's registers and receive FIFO: vm-superio's `SerialState`, which has no serde of its
/// own (the fields are mirrored in [`SerialStateDef`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialPortState(#[serde(with = "SerialStateDef")] pub SerialState);

#[derive(Serialize, Deserialize)]
#[serde(remote = "SerialState")]
struct SerialStateDef {
    baud_divisor_low: u8,
    baud_divisor_high: u8,
    interrupt_enable: u8,
    interrupt_identification: u8,
    line_control: u8,
    line_status: u8,
    modem_control: u8,
    modem_status: u8,
    scratch: u8,
    /// Bytes received and not yet read by the guest, oldest first.
    in_buffer: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum SerialStateError {
    #[error("the serial state's FIFO holds {0} bytes; a 16550 holds at most {FIFO_SIZE}")]
    FifoOverflow(usize),
    #[error("the serial state's interrupt enable register {0:#04x} sets bits a 16550 does not have")]
    InterruptEnable(u8),
    #[error(
        "the serial state's interrupt identification {0:#04x} is none the UART reports (no interrupt, \
         transmitter empty, data received)"
    )]
    InterruptIdentification(u8),
    #[error(
        "the serial state's line status {status:#04x} does not fit its {fifo}-byte FIFO (the \
         transmitter is always idle, and data is ready exactly when the FIFO holds bytes)"
    )]
    LineStatus { status: u8, fifo: usize },
    #[error("cannot raise the restored serial port's interrupt: {0}")]
    Interrupt(std::io::Error),
}

impl SerialPortState {
    fn check(&self) -> Result<(), SerialStateError> {
        let state = &self.0;
        let fifo = state.in_buffer.len();
        if fifo > FIFO_SIZE {
            return Err(SerialStateError::FifoOverflow(fifo));
        }
        if state.interrupt_enable & !IER_VALID != 0 {
            return Err(SerialStateError::InterruptEnable(state.interrupt_enable));
        }
        if !IIR_VALUES.contains(&state.interrupt_identification) {
            return Err(SerialStateError::InterruptIdentification(state.interrupt_identification));
        }
        let ready = if fifo > 0 { LSR_DATA_READY } else { 0 };
        if state.line_status != LSR_IDLE | ready {
            return Err(SerialStateError::LineStatus { status: state.line_status, fifo });
        }
        Ok(())
    }
}

impl Persist for SerialPort {
    type State = SerialPortState;
    /// The port's interrupt line (COM1's IOAPIC pin on the new VM) and where its output goes.
    type ConstructorArgs = (LegacyLine, SerialOutput);
    type Error = SerialStateError;

    fn save(&self) -> Result<SerialPortState, SerialStateError> {
        Ok(SerialPortState(self.uart.state()))
    }

    /// The port in `state`; an interrupt the state says is pending and enabled is raised again
    /// on the new line, as vm-superio's `from_state` does.
    fn restore(
        (irq, output): (LegacyLine, SerialOutput),
        state: &SerialPortState,
    ) -> Result<SerialPort, SerialStateError> {
        state.check()?;
        let uart = Serial::from_state(&state.0, irq, NoEvents, output).map_err(|e| match e {
            vm_superio::serial::Error::FullFifo => SerialStateError::FifoOverflow(state.0.in_buffer.len()),
            vm_superio::serial::Error::Trigger(e) | vm_superio::serial::Error::IOError(e) => {
                SerialStateError::Interrupt(e)
            }
        })?;
        Ok(SerialPort { uart })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::interrupts::testing::TestVm;
    use crate::interrupts::InterruptManager;

    const DATA: u64 = 0;
    const IER: u64 = 1;
    const IIR: u64 = 2;
    const LSR: u64 = 5;
    const SCRATCH: u64 = 7;

    /// Output the test reads back.
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

    fn read(port: &mut SerialPort, offset: u64) -> u8 {
        let mut data = [0];
        port.read(COM1_BASE, offset, &mut data);
        data[0]
    }

    fn line(interrupts: &InterruptManager) -> LegacyLine {
        interrupts.legacy_line(4).unwrap()
    }

    #[test]
    fn queued_input_and_registers_survive_a_restore() {
        let old = TestVm::new();
        let old_interrupts = InterruptManager::new(old.vm.clone()).unwrap();
        let before = Console::default();
        let mut port = SerialPort::new(line(&old_interrupts), Box::new(before.clone()));
        port.write(COM1_BASE, SCRATCH, &[0x5a]);
        assert_eq!(port.enqueue_input(b"hi!"), 3);
        assert_eq!(read(&mut port, DATA), b'h');
        port.write(COM1_BASE, IER, &[0x01]); // received data waits: its interrupt is raised
        port.write(COM1_BASE, DATA, b"o");

        let state = port.save().unwrap();
        assert_eq!(state.0.in_buffer, b"i!");
        assert_eq!(state.0.line_status, LSR_IDLE | LSR_DATA_READY);
        assert_eq!(state.0.interrupt_identification, 0x04);
        let new = TestVm::new();
        let new_interrupts = InterruptManager::new(new.vm.clone()).unwrap();
        let after = Console::default();
        let mut port = SerialPort::restore((line(&new_interrupts), Box::new(after.clone())), &state).unwrap();
        assert_eq!(port.save().unwrap(), state, "save, restore, save: the same state");

        assert_eq!(read(&mut port, SCRATCH), 0x5a);
        assert_eq!(read(&mut port, IER), 0x01);
        assert_eq!(read(&mut port, IIR) & 0x0f, 0x04, "the received-data interrupt is still pending");
        assert_eq!(read(&mut port, DATA), b'i', "a byte queued before the save is read after it");
        assert_eq!(read(&mut port, DATA), b'!');
        assert_eq!(read(&mut port, LSR) & LSR_DATA_READY, 0, "and the FIFO is empty after it");
        port.write(COM1_BASE, DATA, b"k");
        assert_eq!(*before.0.lock().unwrap(), b"o");
        assert_eq!(*after.0.lock().unwrap(), b"k", "output goes to the restored sink");
    }

    #[test]
    fn malformed_states_are_refused() {
        let vm = TestVm::new();
        let interrupts = InterruptManager::new(vm.vm.clone()).unwrap();
        let good = SerialPort::new(line(&interrupts), Box::new(std::io::sink())).save().unwrap();
        let refuse = |state: SerialPortState| {
            SerialPort::restore((line(&interrupts), Box::new(std::io::sink())), &state).err().unwrap()
        };

        let error = refuse(SerialPortState(SerialState {
            in_buffer: vec![b'x'; 90],
            line_status: 0x61,
            ..good.0.clone()
        }));
        assert!(matches!(error, SerialStateError::FifoOverflow(90)), "{error}");
        assert_eq!(error.to_string(), "the serial state's FIFO holds 90 bytes; a 16550 holds at most 64");
        let error = refuse(SerialPortState(SerialState { interrupt_enable: 0x10, ..good.0.clone() }));
        assert!(matches!(error, SerialStateError::InterruptEnable(0x10)), "{error}");
        for iir in [0x00, 0x03, 0xc1] {
            let error =
                refuse(SerialPortState(SerialState { interrupt_identification: iir, ..good.0.clone() }));
            assert!(matches!(error, SerialStateError::InterruptIdentification(_)), "{error}");
        }
        let error = refuse(SerialPortState(SerialState { in_buffer: vec![b'x'], ..good.0.clone() }));
        assert!(matches!(error, SerialStateError::LineStatus { status: 0x60, fifo: 1 }), "{error}");
        let error = refuse(SerialPortState(SerialState { line_status: 0x61, ..good.0.clone() }));
        assert!(matches!(error, SerialStateError::LineStatus { status: 0x61, fifo: 0 }), "{error}");
        let error = refuse(SerialPortState(SerialState { line_status: 0x00, ..good.0.clone() }));
        assert!(matches!(error, SerialStateError::LineStatus { .. }), "{error}");

        let full = SerialPortState(SerialState {
            in_buffer: vec![b'x'; FIFO_SIZE],
            line_status: 0x61,
            ..good.0.clone()
        });
        let mut port = SerialPort::restore((line(&interrupts), Box::new(std::io::sink())), &full).unwrap();
        assert_eq!(port.enqueue_input(b"y"), 0, "a full FIFO restores full");
    }
}
