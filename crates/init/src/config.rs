//! The app's command and environment, as nitro-cli's build-enclave writes them: `/cmd` and
//! `/env` in the initramfs root, one entry per line, no quoting.

/// What PID 1 searches for a command without a slash, whatever the image's own PATH says
/// (AWS's init does the same; the image's Env goes to the app untouched).
pub const SEARCH_PATH: &str = "/sbin:/usr/sbin:/bin:/usr/bin";

/// One entry per line; only the trailing `\n` of each is removed, so `\r` and spaces stay and an
/// empty line is an empty entry, as AWS's init reads them.
pub fn entries(text: &str) -> Vec<String> {
    let mut lines: Vec<String> = text.split('\n').map(str::to_string).collect();
    if text.is_empty() || text.ends_with('\n') {
        lines.pop();
    }
    lines
}

/// The app's argv and environment, with AWS's defaults for files that hold nothing.
pub fn app(cmd: &str, env: &str) -> (Vec<String>, Vec<String>) {
    let mut argv = entries(cmd);
    if argv.is_empty() {
        argv.push("sh".into());
    }
    let mut envp = entries(env);
    if envp.is_empty() {
        envp.push(format!("PATH={SEARCH_PATH}"));
    }
    (argv, envp)
}

/// How the app ended, as the parent hears it (one line on the exit-status port).
#[derive(Debug, PartialEq, Eq)]
pub enum AppEnd {
    Exited(i32),
    Killed(i32),
}

impl AppEnd {
    pub fn from_wait_status(status: i32) -> AppEnd {
        if libc::WIFSIGNALED(status) {
            AppEnd::Killed(libc::WTERMSIG(status))
        } else {
            AppEnd::Exited(libc::WEXITSTATUS(status))
        }
    }

    pub fn line(&self) -> String {
        match self {
            AppEnd::Exited(code) => format!("exit {code}\n"),
            AppEnd::Killed(signal) => format!("signal {signal}\n"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_entry_per_line_keeping_spaces_and_empty_lines() {
        assert_eq!(entries("/bin/app\n--flag\n\n a b\r\n"), ["/bin/app", "--flag", "", " a b\r"]);
        assert_eq!(entries("last without newline"), ["last without newline"]);
        assert!(entries("").is_empty());
    }

    #[test]
    fn empty_files_give_awss_defaults() {
        assert_eq!(app("", ""), (vec!["sh".to_string()], vec![format!("PATH={SEARCH_PATH}")]));
        assert_eq!(app("/app\n", "A=1\n").0, ["/app"]);
    }

    #[test]
    fn exit_lines() {
        assert_eq!(AppEnd::from_wait_status(7 << 8).line(), "exit 7\n");
        assert_eq!(AppEnd::from_wait_status(libc::SIGSEGV).line(), format!("signal {}\n", libc::SIGSEGV));
    }
}
