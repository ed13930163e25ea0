//! carve's log lines on standard error (`carve: warning: …`). Only carve's own targets are shown
//! below debug level, so a guest cannot make a dependency log once per bad descriptor.

use log::{Level, LevelFilter, Log, Metadata, Record};

struct StderrLogger {
    level: LevelFilter,
}

impl Log for StderrLogger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= self.level
            && (metadata.target().starts_with("carve") || self.level >= LevelFilter::Debug)
    }

    fn log(&self, record: &Record) {
        if self.enabled(record.metadata()) {
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
    if log::set_logger(Box::leak(Box::new(StderrLogger { level }))).is_ok() {
        log::set_max_level(level);
    }
}

pub fn parse_level(text: &str) -> Result<LevelFilter, String> {
    text.parse().map_err(|_| format!("'{text}' is not a log level (error, warn, info, debug)"))
}
