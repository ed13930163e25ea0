//! Images a local Docker daemon already has, exported through its Engine API (`GET
//! /images/{name}/get`, the `docker save` format) as nitro-cli's users expect: an image they
//! built or loaded but never pushed still builds. No daemon answering is not an error.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use crate::oci::anonymous_file;
use crate::{Image, ImageError};

const DEFAULT_SOCKET: &str = "/var/run/docker.sock";

/// The image `uri` from the daemon, or `None` when no daemon answers or it lacks the image.
pub(crate) fn export(uri: &str) -> Result<Option<Image>, ImageError> {
    let Some(socket) = socket_path() else { return Ok(None) };
    // Characters Docker's references never hold would change the request's meaning.
    if !uri.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-/:@".contains(&b)) {
        return Ok(None);
    }
    let Ok((status, _)) = get(&socket, &format!("/images/{uri}/json")) else { return Ok(None) };
    if status != 200 {
        return Ok(None);
    }
    let fail = |what: String| ImageError::Pull(format!("cannot export {uri} from the Docker daemon: {what}"));
    let (status, mut body) = get(&socket, &format!("/images/{uri}/get")).map_err(|e| fail(e.to_string()))?;
    if status != 200 {
        return Err(fail(format!("it answered HTTP {status}")));
    }
    let mut archive = anonymous_file().map_err(|e| fail(format!("cannot make a temporary file: {e}")))?;
    io::copy(&mut body, &mut archive).map_err(|e| fail(e.to_string()))?;
    // The export holds exactly this image, tagged as the daemon spells it.
    let image = Image::from_archive(archive, &format!("the Docker daemon's {uri}"), None)?;
    Ok(Some(image.named(uri)))
}

/// `DOCKER_HOST` when it names a Unix socket, else Docker's default; none for a TCP daemon.
fn socket_path() -> Option<PathBuf> {
    match std::env::var("DOCKER_HOST") {
        Ok(host) if !host.is_empty() => host.strip_prefix("unix://").map(PathBuf::from),
        _ => Some(PathBuf::from(DEFAULT_SOCKET)),
    }
}

/// An HTTP/1.0 GET: the daemon then sends the body unchunked and closes the connection.
fn get(socket: &PathBuf, path: &str) -> io::Result<(u16, impl Read)> {
    let mut stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: docker\r\n\r\n")?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.by_ref().take(1024).read_line(&mut line)?;
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "not an HTTP answer"))?;
    // Headers end at an empty line; 64 KiB of them is more than any daemon sends.
    let mut header_bytes = 0;
    loop {
        line.clear();
        header_bytes += reader.by_ref().take(8192).read_line(&mut line)?;
        if line.trim_end().is_empty() || header_bytes > 64 << 10 {
            break;
        }
    }
    Ok((status, reader))
}
