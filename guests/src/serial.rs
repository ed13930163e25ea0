//! Polled 8250 UART output on COM1.

use crate::io::{inb, outb};

const COM1: u16 = 0x3f8;
const LINE_STATUS: u16 = 5;
const TX_EMPTY: u8 = 0x20;

pub struct Serial;

impl core::fmt::Write for Serial {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        for byte in s.bytes() {
            if byte == b'\n' {
                put(b'\r');
            }
            put(byte);
        }
        Ok(())
    }
}

fn put(byte: u8) {
    while inb(COM1 + LINE_STATUS) & TX_EMPTY == 0 {}
    outb(COM1, byte);
}

#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => {{
        let _ = core::fmt::Write::write_fmt(&mut $crate::serial::Serial, format_args!($($arg)*));
    }};
}

#[macro_export]
macro_rules! println {
    () => { $crate::print!("\n") };
    ($($arg:tt)*) => {{ $crate::print!($($arg)*); $crate::print!("\n"); }};
}
