//! The NSM's wire format: CBOR of aws-nitro-enclaves-nsm-api's `Request` and `Response` (serde's
//! externally tagged enums: a unit variant is a text string, a struct variant a one-entry map
//! from its name to a map of its fields, in declaration order).
//!
//! Requests come from the guest and are parsed defensively: anything that is not one CBOR item of
//! a known request is answered with an [`ErrorCode`], never a panic.

use ciborium::Value;

/// The largest request the NSM reads (the driver refuses larger ones with EMSGSIZE).
pub const MAX_REQUEST: usize = 0x1000;
/// The response buffer every NSM driver supplies.
pub const RESPONSE_BUFFER: usize = 0x3000;

/// nsm-api's `ErrorCode`, spelled as on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorCode {
    Success,
    InvalidArgument,
    InvalidIndex,
    InvalidResponse,
    ReadOnlyIndex,
    InvalidOperation,
    BufferTooSmall,
    InputTooLarge,
    InternalError,
}

impl ErrorCode {
    pub fn name(self) -> &'static str {
        match self {
            ErrorCode::Success => "Success",
            ErrorCode::InvalidArgument => "InvalidArgument",
            ErrorCode::InvalidIndex => "InvalidIndex",
            ErrorCode::InvalidResponse => "InvalidResponse",
            ErrorCode::ReadOnlyIndex => "ReadOnlyIndex",
            ErrorCode::InvalidOperation => "InvalidOperation",
            ErrorCode::BufferTooSmall => "BufferTooSmall",
            ErrorCode::InputTooLarge => "InputTooLarge",
            ErrorCode::InternalError => "InternalError",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    DescribePcr { index: u64 },
    ExtendPcr { index: u64, data: Vec<u8> },
    LockPcr { index: u64 },
    LockPcrs { range: u64 },
    DescribeNsm,
    Attestation { user_data: Option<Vec<u8>>, nonce: Option<Vec<u8>>, public_key: Option<Vec<u8>> },
    GetRandom,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NsmDescription {
    pub version_major: u16,
    pub version_minor: u16,
    pub version_patch: u16,
    pub module_id: String,
    pub max_pcrs: u16,
    pub locked_pcrs: Vec<u16>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Response {
    DescribePcr { lock: bool, data: Vec<u8> },
    ExtendPcr { data: Vec<u8> },
    LockPcr,
    LockPcrs,
    DescribeNsm(NsmDescription),
    Attestation { document: Vec<u8> },
    GetRandom { random: Vec<u8> },
    Error(ErrorCode),
}

impl Request {
    /// Parses one request. Bytes that are not a single CBOR item naming a known request are an
    /// `InvalidOperation`; a known request with missing or mistyped fields is an
    /// `InvalidArgument`; a request past [`MAX_REQUEST`] is `InputTooLarge`.
    pub fn decode(bytes: &[u8]) -> Result<Request, ErrorCode> {
        if bytes.len() > MAX_REQUEST {
            return Err(ErrorCode::InputTooLarge);
        }
        let mut reader = bytes;
        let value: Value = ciborium::from_reader(&mut reader).map_err(|_| ErrorCode::InvalidOperation)?;
        if !reader.is_empty() {
            return Err(ErrorCode::InvalidOperation);
        }
        match value {
            Value::Text(name) => match name.as_str() {
                "DescribeNSM" => Ok(Request::DescribeNsm),
                "GetRandom" => Ok(Request::GetRandom),
                _ => Err(ErrorCode::InvalidOperation),
            },
            Value::Map(mut entries) if entries.len() == 1 => {
                let (name, body) = entries.pop().expect("one entry");
                let Value::Text(name) = name else { return Err(ErrorCode::InvalidOperation) };
                let fields = Fields::new(body, &name)?;
                match name.as_str() {
                    "DescribePCR" => Ok(Request::DescribePcr { index: fields.index("index")? }),
                    "ExtendPCR" => {
                        Ok(Request::ExtendPcr { index: fields.index("index")?, data: fields.bytes("data")? })
                    }
                    "LockPCR" => Ok(Request::LockPcr { index: fields.index("index")? }),
                    "LockPCRs" => Ok(Request::LockPcrs { range: fields.index("range")? }),
                    "Attestation" => Ok(Request::Attestation {
                        user_data: fields.optional_bytes("user_data")?,
                        nonce: fields.optional_bytes("nonce")?,
                        public_key: fields.optional_bytes("public_key")?,
                    }),
                    _ => Err(ErrorCode::InvalidOperation),
                }
            }
            _ => Err(ErrorCode::InvalidOperation),
        }
    }

    /// The request's CBOR, as nsm-api's client sends it.
    pub fn encode(&self) -> Vec<u8> {
        let index = |i: u64| Value::Integer(i.into());
        let value = match self {
            Request::DescribePcr { index: i } => variant("DescribePCR", vec![("index", index(*i))]),
            Request::ExtendPcr { index: i, data } => {
                variant("ExtendPCR", vec![("index", index(*i)), ("data", Value::Bytes(data.clone()))])
            }
            Request::LockPcr { index: i } => variant("LockPCR", vec![("index", index(*i))]),
            Request::LockPcrs { range } => variant("LockPCRs", vec![("range", index(*range))]),
            Request::DescribeNsm => Value::Text("DescribeNSM".into()),
            Request::Attestation { user_data, nonce, public_key } => variant(
                "Attestation",
                vec![
                    ("user_data", optional_bytes(user_data)),
                    ("nonce", optional_bytes(nonce)),
                    ("public_key", optional_bytes(public_key)),
                ],
            ),
            Request::GetRandom => Value::Text("GetRandom".into()),
        };
        to_vec(&value)
    }
}

impl Response {
    pub fn encode(&self) -> Vec<u8> {
        let value = match self {
            Response::DescribePcr { lock, data } => variant(
                "DescribePCR",
                vec![("lock", Value::Bool(*lock)), ("data", Value::Bytes(data.clone()))],
            ),
            Response::ExtendPcr { data } => variant("ExtendPCR", vec![("data", Value::Bytes(data.clone()))]),
            Response::LockPcr => Value::Text("LockPCR".into()),
            Response::LockPcrs => Value::Text("LockPCRs".into()),
            Response::DescribeNsm(d) => variant(
                "DescribeNSM",
                vec![
                    ("version_major", Value::Integer(d.version_major.into())),
                    ("version_minor", Value::Integer(d.version_minor.into())),
                    ("version_patch", Value::Integer(d.version_patch.into())),
                    ("module_id", Value::Text(d.module_id.clone())),
                    ("max_pcrs", Value::Integer(d.max_pcrs.into())),
                    (
                        "locked_pcrs",
                        Value::Array(d.locked_pcrs.iter().map(|&i| Value::Integer(i.into())).collect()),
                    ),
                    ("digest", Value::Text("SHA384".into())),
                ],
            ),
            Response::Attestation { document } => {
                variant("Attestation", vec![("document", Value::Bytes(document.clone()))])
            }
            Response::GetRandom { random } => {
                variant("GetRandom", vec![("random", Value::Bytes(random.clone()))])
            }
            Response::Error(code) => {
                Value::Map(vec![(Value::Text("Error".into()), Value::Text(code.name().into()))])
            }
        };
        to_vec(&value)
    }
}

fn variant(name: &str, fields: Vec<(&str, Value)>) -> Value {
    let body = fields.into_iter().map(|(k, v)| (Value::Text(k.into()), v)).collect();
    Value::Map(vec![(Value::Text(name.into()), Value::Map(body))])
}

fn optional_bytes(bytes: &Option<Vec<u8>>) -> Value {
    bytes.as_ref().map_or(Value::Null, |b| Value::Bytes(b.clone()))
}

pub(crate) fn to_vec(value: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    ciborium::into_writer(value, &mut out).expect("writing CBOR to a Vec cannot fail");
    out
}

/// A request's field map, looked up by name; unknown fields are ignored, as serde does.
struct Fields(Vec<(Value, Value)>);

impl Fields {
    fn new(body: Value, _variant: &str) -> Result<Fields, ErrorCode> {
        match body {
            Value::Map(entries) => Ok(Fields(entries)),
            _ => Err(ErrorCode::InvalidArgument),
        }
    }

    fn get(&self, name: &str) -> Option<&Value> {
        self.0.iter().find(|(k, _)| k.as_text() == Some(name)).map(|(_, v)| v)
    }

    fn index(&self, name: &str) -> Result<u64, ErrorCode> {
        let value = self.get(name).and_then(Value::as_integer).ok_or(ErrorCode::InvalidArgument)?;
        u64::try_from(value).map_err(|_| ErrorCode::InvalidArgument)
    }

    fn bytes(&self, name: &str) -> Result<Vec<u8>, ErrorCode> {
        match self.get(name) {
            Some(Value::Bytes(bytes)) => Ok(bytes.clone()),
            _ => Err(ErrorCode::InvalidArgument),
        }
    }

    /// A byte string, null, or absent.
    fn optional_bytes(&self, name: &str) -> Result<Option<Vec<u8>>, ErrorCode> {
        match self.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Bytes(bytes)) => Ok(Some(bytes.clone())),
            Some(_) => Err(ErrorCode::InvalidArgument),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip() {
        let requests = [
            Request::DescribePcr { index: 3 },
            Request::ExtendPcr { index: 16, data: vec![1, 2, 3] },
            Request::LockPcr { index: 17 },
            Request::LockPcrs { range: 20 },
            Request::DescribeNsm,
            Request::Attestation { user_data: Some(b"u".to_vec()), nonce: None, public_key: Some(vec![]) },
            Request::GetRandom,
        ];
        for request in requests {
            assert_eq!(Request::decode(&request.encode()), Ok(request));
        }
    }

    #[test]
    fn malformed_requests_get_the_right_error() {
        let decode = |v: Value| Request::decode(&to_vec(&v));
        assert_eq!(Request::decode(&[]), Err(ErrorCode::InvalidOperation));
        assert_eq!(Request::decode(&[0xff]), Err(ErrorCode::InvalidOperation));
        assert_eq!(decode(Value::Text("Reboot".into())), Err(ErrorCode::InvalidOperation));
        assert_eq!(decode(Value::Integer(7.into())), Err(ErrorCode::InvalidOperation));
        let mut trailing = Request::GetRandom.encode();
        trailing.push(0);
        assert_eq!(Request::decode(&trailing), Err(ErrorCode::InvalidOperation));
        let bad_index = variant("DescribePCR", vec![("index", Value::Integer((-1).into()))]);
        assert_eq!(decode(bad_index), Err(ErrorCode::InvalidArgument));
        let text_data = variant(
            "ExtendPCR",
            vec![("index", Value::Integer(16.into())), ("data", Value::Text("x".into()))],
        );
        assert_eq!(decode(text_data), Err(ErrorCode::InvalidArgument));
        assert_eq!(decode(variant("LockPCR", vec![])), Err(ErrorCode::InvalidArgument));
        let not_a_map = Value::Map(vec![(Value::Text("LockPCR".into()), Value::Integer(1.into()))]);
        assert_eq!(decode(not_a_map), Err(ErrorCode::InvalidArgument));
        assert_eq!(Request::decode(&vec![0; MAX_REQUEST + 1]), Err(ErrorCode::InputTooLarge));
    }
}
