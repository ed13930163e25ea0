//! A bare-metal driver for the Nitro Secure Module (virtio-nsm, device ID 33): one request at a
//! time, a CBOR request in a device-readable buffer and a 0x3000-byte device-writable buffer for
//! the response, polled. Also the few CBOR pieces the guests need to build requests and read
//! responses.

use crate::io::phys_slice;
use crate::virtio::{MmioDevice, Virtqueue, VIRTIO_F_VERSION_1};

pub const DEVICE_ID: u32 = 33;
pub const MAX_REQUEST: usize = 0x1000;
pub const RESPONSE_BUFFER: u32 = 0x3000;
const QUEUE_SIZE: u16 = 2;

pub struct Nsm {
    device: MmioDevice,
    queue: Virtqueue,
}

impl Nsm {
    /// Sets the device up with its queue and buffers in the DMA area at `dma`.
    pub fn new(device: MmioDevice, dma: u64) -> Result<Nsm, &'static str> {
        device.init(DEVICE_ID, VIRTIO_F_VERSION_1)?;
        let queue = Virtqueue::new(&device, 0, QUEUE_SIZE, RESPONSE_BUFFER, dma);
        device.driver_ok();
        Ok(Nsm { device, queue })
    }

    /// Bytes of DMA area `new` uses.
    pub fn dma_size() -> u64 {
        Virtqueue::footprint(QUEUE_SIZE, RESPONSE_BUFFER)
    }

    /// Sends `request` and waits for the response, which stays valid until the next call.
    pub fn call(&mut self, request: &[u8]) -> &'static [u8] {
        assert!(request.len() <= MAX_REQUEST);
        let (req, resp) = (0u16, 1u16);
        // SAFETY: descriptor 0's slot is ours while no request is outstanding.
        unsafe {
            core::ptr::copy_nonoverlapping(request.as_ptr(), self.queue.slot(req) as *mut u8, request.len())
        };
        self.queue.push_chain(&[(req, request.len() as u32, false), (resp, RESPONSE_BUFFER, true)]);
        self.device.notify(0);
        let len = loop {
            if let Some((_, len)) = self.queue.pop_used() {
                break len;
            }
            core::hint::spin_loop();
        };
        self.device.ack_interrupts();
        phys_slice(self.queue.slot(resp), len.min(RESPONSE_BUFFER) as usize)
    }
}

/// A CBOR writer into a fixed buffer (definite lengths only, as nsm-api's serde_cbor writes).
pub struct Cbor<'a> {
    buf: &'a mut [u8],
    len: usize,
}

impl<'a> Cbor<'a> {
    pub fn new(buf: &'a mut [u8]) -> Cbor<'a> {
        Cbor { buf, len: 0 }
    }

    pub fn bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    fn put(&mut self, bytes: &[u8]) -> &mut Self {
        self.buf[self.len..self.len + bytes.len()].copy_from_slice(bytes);
        self.len += bytes.len();
        self
    }

    pub fn head(&mut self, major: u8, value: u64) -> &mut Self {
        let m = major << 5;
        match value {
            0..=23 => self.put(&[m | value as u8]),
            24..=0xff => self.put(&[m | 24, value as u8]),
            0x100..=0xffff => self.put(&[m | 25]).put(&(value as u16).to_be_bytes()),
            0x1_0000..=0xffff_ffff => self.put(&[m | 26]).put(&(value as u32).to_be_bytes()),
            _ => self.put(&[m | 27]).put(&value.to_be_bytes()),
        }
    }

    pub fn uint(&mut self, value: u64) -> &mut Self {
        self.head(0, value)
    }

    pub fn byte_string(&mut self, bytes: &[u8]) -> &mut Self {
        self.head(2, bytes.len() as u64).put(bytes)
    }

    pub fn text(&mut self, text: &str) -> &mut Self {
        self.head(3, text.len() as u64).put(text.as_bytes())
    }

    pub fn map(&mut self, entries: u64) -> &mut Self {
        self.head(5, entries)
    }

    pub fn null(&mut self) -> &mut Self {
        self.put(&[0xf6])
    }

    /// A byte string, or null for `None`.
    pub fn optional(&mut self, bytes: Option<&[u8]>) -> &mut Self {
        match bytes {
            Some(bytes) => self.byte_string(bytes),
            None => self.null(),
        }
    }
}

/// Builds `{"Attestation": {"user_data", "nonce", "public_key"}}` into `buf`; returns its length.
pub fn attestation_request(buf: &mut [u8], user_data: Option<&[u8]>, nonce: Option<&[u8]>) -> usize {
    let mut cbor = Cbor::new(buf);
    cbor.map(1).text("Attestation").map(3);
    cbor.text("user_data").optional(user_data);
    cbor.text("nonce").optional(nonce);
    cbor.text("public_key").null();
    cbor.bytes().len()
}

/// Reads one CBOR head at `at`: (major type, argument, bytes taken).
fn read_head(data: &[u8], at: usize) -> Option<(u8, u64, usize)> {
    let first = *data.get(at)?;
    let (major, info) = (first >> 5, first & 0x1f);
    let width = match info {
        0..=23 => return Some((major, info as u64, 1)),
        24 => 1,
        25 => 2,
        26 => 4,
        27 => 8,
        _ => return None,
    };
    let bytes = data.get(at + 1..at + 1 + width)?;
    let value = bytes.iter().fold(0u64, |v, &b| v << 8 | b as u64);
    Some((major, value, 1 + width))
}

/// For a response `{"<variant>": {"<field>": <bstr>, ...}}`, the byte string of `field` when the
/// variant is `variant`; `Err` carries the error name of an `{"Error": name}` response.
pub fn response_bytes<'a>(response: &'a [u8], variant: &str, field: &str) -> Result<&'a [u8], &'a str> {
    let text_at = |at: usize| -> Option<(&'a str, usize)> {
        let (major, len, taken) = read_head(response, at)?;
        let bytes = response.get(at + taken..at + taken + len as usize)?;
        (major == 3).then_some((core::str::from_utf8(bytes).ok()?, taken + len as usize))
    };
    let (major, entries, mut at) = read_head(response, 0).ok_or("malformed")?;
    if major != 5 || entries != 1 {
        return Err("malformed");
    }
    let (name, taken) = text_at(at).ok_or("malformed")?;
    at += taken;
    if name == "Error" {
        return Err(text_at(at).map(|(code, _)| code).unwrap_or("malformed"));
    }
    if name != variant {
        return Err("unexpected response");
    }
    let (major, fields, taken) = read_head(response, at).ok_or("malformed")?;
    if major != 5 {
        return Err("malformed");
    }
    at += taken;
    for _ in 0..fields {
        let (key, taken) = text_at(at).ok_or("malformed")?;
        at += taken;
        let (major, len, taken) = read_head(response, at).ok_or("malformed")?;
        if key == field && major == 2 {
            return response.get(at + taken..at + taken + len as usize).ok_or("malformed");
        }
        // Skip a simple value or a byte/text string (the only field types before ours).
        at += taken + if major == 2 || major == 3 { len as usize } else { 0 };
    }
    Err("field not found")
}
