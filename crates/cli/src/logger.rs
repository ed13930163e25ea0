//! carve's log lines on standard error (`carve: warning: …`). Only carve's own targets are shown
//! below debug level, so a guest cannot make a dependency log once per bad descriptor.

use log::{Level, LevelFilter, Log, Metadata, Record};

struct StderrLogger {
    level: LevelFilter,
    /// A file that gets the lines too, at its own level, in nitro-cli's log format.
    file: Option<(std::sync::Mutex<std::fs::File>, LevelFilter)>,
}

impl StderrLogger {
    fn to_stderr(&self, metadata: &Metadata) -> bool {
        metadata.level() <= self.level
            && (metadata.target().starts_with("carve") || self.level >= LevelFilter::Debug)
    }

    fn to_file(&self, metadata: &Metadata) -> bool {
        self.file
            .as_ref()
            .is_some_and(|(_, level)| metadata.level() <= *level && metadata.target().starts_with("carve"))
    }
}

impl Log for StderrLogger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        self.to_stderr(metadata) || self.to_file(metadata)
    }

    fn log(&self, record: &Record) {
        if let (true, Some((file, _))) = (self.to_file(record.metadata()), &self.file) {
            // nitro-cli's: [logger][LEVEL][time][file:line] message
            let line = format!(
                "[nitro-cli][{}][{}][{}:{}] {}\n",
                record.level(),
                carve_eif::metadata::rfc3339_now(),
                record.file().unwrap_or("?"),
                record.line().unwrap_or(0),
                record.args()
            );
            if let Ok(mut file) = file.lock() {
                let _ = std::io::Write::write_all(&mut *file, line.as_bytes());
            }
        }
        if self.to_stderr(record.metadata()) {
            let level = match record.level() {
                Level::Error => "error",
                Level::Warn => "warning",
                Level::Info => "info",
                Level::Debug => "debug",
                Level::Trace => "trace",
            };
            eprintln!("carve: {level}: {}", record.args());
        }
    }

    fn flush(&self) {}
}

pub fn init(level: LevelFilter) {
    init_with_file(level, None);
}

/// As [`init`], with `file` also getting the lines at its level (nitro-cli's log).
pub fn init_with_file(level: LevelFilter, file: Option<(std::fs::File, LevelFilter)>) {
    let max = file.as_ref().map_or(level, |(_, file_level)| level.max(*file_level));
    let file = file.map(|(f, l)| (std::sync::Mutex::new(f), l));
    if log::set_logger(Box::leak(Box::new(StderrLogger { level, file }))).is_ok() {
        log::set_max_level(max);
    }
}

pub fn parse_level(text: &str) -> Result<LevelFilter, String> {
    text.parse().map_err(|_| format!("'{text}' is not a log level (error, warn, info, debug)"))
}
