//! Log setup: `tracing` to stderr, human or JSON lines.
//!
//! Why a field formatter of our own: log lines carry values taken from broker
//! messages (task ids, task names, queue names, error texts that quote them).
//! tracing-subscriber's default human formatter writes `%value` fields and the
//! message verbatim, so a task id holding a newline and ANSI escapes could
//! forge a log line of its own (`...\n2026-01-01T00:00:00Z ERROR forged`) or
//! recolour a terminal. [`SafeFields`] formats every field (and the message)
//! like the default one, then escapes control characters (newlines, ESC,
//! C1, bidi overrides, line/paragraph separators) and truncates values longer
//! than [`MAX_VALUE_CHARS`] (the message: [`MAX_MESSAGE_CHARS`]) noting the full length, so
//! one event is one line and a 100 kB task id cannot make 100 kB log lines.
//! The JSON format needs no escaping (serde_json escapes control characters);
//! its values are not truncated.

use std::fmt::{self, Write as _};

use tracing::field::{Field, Visit};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::FormatFields;

/// Longest field value written (in chars, after escaping); longer ones are cut with a note.
pub const MAX_VALUE_CHARS: usize = 256;

/// Longest message written (in chars, after escaping).
pub const MAX_MESSAGE_CHARS: usize = 2048;

/// Human log format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// One line per event, values escaped and truncated ([`SafeFields`]).
    Human,
    /// One JSON object per line (tracing-subscriber's JSON formatter).
    Json,
}

/// Installs the global subscriber writing to stderr. `level` is Celery's
/// `-l` (`warning`, `critical` accepted); `OM_WORKER_LOG` (a tracing filter)
/// overrides it. A second call does nothing.
pub fn init(level: &str, format: Format) {
    let level = match level.to_ascii_lowercase().as_str() {
        "warning" => "warn".to_owned(),
        "critical" | "fatal" => "error".to_owned(),
        other => other.to_owned(),
    };
    let filter =
        tracing_subscriber::EnvFilter::try_from_env("OM_WORKER_LOG").unwrap_or_else(|_| {
            tracing_subscriber::EnvFilter::new(format!("om_worker={level},zeromq=error,warn"))
        });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let _ = match format {
        Format::Human => builder.fmt_fields(SafeFields).try_init(),
        Format::Json => builder.json().try_init(),
    };
}

/// Field formatter for human logs: `name=value` pairs separated by spaces,
/// the message first and bare, as tracing-subscriber's default, with every
/// value escaped and bounded (see the module docs).
#[derive(Debug, Clone, Copy, Default)]
pub struct SafeFields;

impl<'w> FormatFields<'w> for SafeFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'w>, fields: R) -> fmt::Result {
        let mut v = SafeVisitor {
            writer,
            first: true,
            result: Ok(()),
        };
        fields.record(&mut v);
        v.result
    }
}

struct SafeVisitor<'w> {
    writer: Writer<'w>,
    first: bool,
    result: fmt::Result,
}

impl SafeVisitor<'_> {
    fn write(&mut self, field: &Field, raw: &str) {
        if self.result.is_err() {
            return;
        }
        let name = field.name();
        // `log` crate metadata forwarded by tracing-log: not worth a field each.
        if name.starts_with("log.") {
            return;
        }
        let sep = if self.first { "" } else { " " };
        self.first = false;
        self.result = if name == "message" {
            write!(
                self.writer,
                "{sep}{}",
                escape_bounded(raw, MAX_MESSAGE_CHARS)
            )
        } else {
            let name = name.strip_prefix("r#").unwrap_or(name);
            write!(
                self.writer,
                "{sep}{name}={}",
                escape_bounded(raw, MAX_VALUE_CHARS)
            )
        };
    }
}

impl Visit for SafeVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        // As the default formatter: strings quoted (Debug), the message bare.
        if field.name() == "message" {
            self.write(field, value);
        } else {
            self.write(field, &format!("{value:?}"));
        }
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.write(field, &value.to_string());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.write(field, &format!("{value:?}"));
    }
}

/// Longest line of a child's stderr that is logged; the rest of a longer line is skipped (its
/// length noted).
pub const MAX_CHILD_LINE: usize = 2000;

/// Logs what a child process (the kernel fork server and, through it, every kernel and task
/// child) writes to its stderr, one WARN event per line (Python writes warnings and tracebacks
/// there), through the subscriber above, so it is
/// escaped like everything else. Inherited, that stderr was the worker's own: a notebook's
/// `os.write(2, b"\n<date> ERROR forged")` became a worker log line. Lines are bounded
/// ([`MAX_CHILD_LINE`]); reading never stops while the pipe is open, so a child never blocks
/// on a full pipe.
pub fn forward_child_stderr<R>(
    reader: R,
    what: &'static str,
    pid: i32,
) -> tokio::task::JoinHandle<()>
where
    R: tokio::io::AsyncRead + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        use tokio::io::AsyncBufReadExt as _;
        let mut r = tokio::io::BufReader::new(reader);
        let mut line: Vec<u8> = Vec::new();
        let mut skipped = 0usize;
        let emit = |line: &mut Vec<u8>, skipped: &mut usize| {
            if !line.is_empty() || *skipped > 0 {
                let text = String::from_utf8_lossy(line);
                if *skipped > 0 {
                    tracing::warn!(target: "om_worker::child", pid, "{what}: {text}… [{} more bytes]", *skipped);
                } else {
                    tracing::warn!(target: "om_worker::child", pid, "{what}: {text}");
                }
            }
            line.clear();
            *skipped = 0;
        };
        loop {
            let buf = match r.fill_buf().await {
                Ok([]) | Err(_) => break,
                Ok(b) => b,
            };
            let (take, done) = match buf.iter().position(|&b| b == b'\n') {
                Some(p) => (p + 1, true),
                None => (buf.len(), false),
            };
            let content = take - usize::from(done); // without the newline
            let room = MAX_CHILD_LINE.saturating_sub(line.len());
            line.extend_from_slice(&buf[..content.min(room)]);
            skipped += content.saturating_sub(room);
            r.consume(take);
            if done {
                emit(&mut line, &mut skipped);
            }
        }
        emit(&mut line, &mut skipped);
    })
}

/// Whether `c` must not reach a log line raw: C0/C1 controls (newline, CR,
/// ESC, DEL, …), and the invisible format characters that reorder or break
/// lines in a terminal or viewer (bidi overrides/isolates, LS/PS).
fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{200e}' | '\u{200f}' | '\u{061c}' | '\u{feff}')
}

/// `s` with control characters escaped (`\n`, `\r`, `\t`, else `\u{1b}`)
/// and cut after `max` chars of output, noting the full length in bytes.
pub fn escape_bounded(s: &str, max: usize) -> String {
    let mut out = String::with_capacity(s.len().min(max + 16));
    let mut chars = 0usize;
    for (i, c) in s.char_indices() {
        let piece_len = if needs_escape(c) {
            match c {
                '\n' | '\r' | '\t' => 2,
                _ => c.escape_unicode().len(),
            }
        } else {
            1
        };
        if chars + piece_len > max {
            let _ = write!(out, "…[truncated: {} of {} bytes shown]", i, s.len());
            return out;
        }
        chars += piece_len;
        if needs_escape(c) {
            match c {
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                _ => {
                    let _ = write!(out, "{}", c.escape_unicode());
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            match self.0.lock() {
                Ok(mut v) => v.extend_from_slice(b),
                Err(p) => p.into_inner().extend_from_slice(b),
            }
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn capture(f: impl FnOnce()) -> String {
        let buf = Buf::default();
        let out = buf.clone();
        let sub = tracing_subscriber::fmt()
            .with_ansi(false)
            .fmt_fields(SafeFields)
            .with_writer(move || out.clone())
            .finish();
        tracing::subscriber::with_default(sub, f);
        let bytes = buf.0.lock().map(|v| v.clone()).unwrap_or_default();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    const FORGED: &str = "abc\n2026-01-01T00:00:00Z ERROR forged\x1b[31m";

    #[test]
    fn message_values_cannot_forge_lines_or_escapes() {
        let id = FORGED.to_owned();
        let log = capture(|| {
            tracing::warn!(task_id = %id, name = ?id, plain = id.as_str(), "received {id}");
            tracing::warn!("debug {id:?} and display {id}");
            let span = tracing::info_span!("task", id = %id);
            let _g = span.enter();
            tracing::error!(queue = %"q\u{2028}x\u{202e}y", "in span");
        });
        assert_eq!(log.lines().count(), 3, "one line per event:\n{log}");
        assert!(!log.contains('\x1b'), "raw ESC in {log:?}");
        assert!(
            !log.contains('\u{2028}') && !log.contains('\u{202e}'),
            "{log:?}"
        );
        for line in log.lines() {
            assert!(
                !line.starts_with("2026-01-01T00:00:00Z"),
                "forged line: {line}"
            );
        }
        assert!(
            log.contains(r"task_id=abc\n2026-01-01T00:00:00Z ERROR forged\u{1b}[31m"),
            "{log}"
        );
        assert!(log.contains(r"received abc\n2026"), "{log}");
        assert!(log.contains(r"id=abc\n2026"), "span field escaped: {log}");
    }

    #[test]
    fn json_logs_escape_control_characters() {
        let buf = Buf::default();
        let out = buf.clone();
        let sub = tracing_subscriber::fmt()
            .json()
            .with_writer(move || out.clone())
            .finish();
        let id = FORGED.to_owned();
        tracing::subscriber::with_default(sub, || {
            tracing::warn!(task_id = %id, "received {id}");
        });
        let bytes = buf.0.lock().map(|v| v.clone()).unwrap_or_default();
        let log = String::from_utf8_lossy(&bytes).into_owned();
        assert_eq!(log.lines().count(), 1, "{log}");
        assert!(!log.contains('\x1b'), "{log:?}");
        let v: serde_json::Value = serde_json::from_str(log.trim()).expect("one JSON object");
        assert_eq!(v["fields"]["task_id"], FORGED);
    }

    #[test]
    fn long_values_are_truncated_with_their_length() {
        let id = "x".repeat(100_000);
        let log = capture(|| tracing::warn!(task_id = %id, "could not answer {id}"));
        assert_eq!(log.lines().count(), 1);
        assert!(
            log.len() < MAX_VALUE_CHARS + MAX_MESSAGE_CHARS + 400,
            "{} bytes",
            log.len()
        );
        assert!(log.contains("of 100000 bytes shown]"), "{log}");
    }

    #[test]
    fn child_stderr_lines_are_logged_escaped_and_bounded() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let mut input = b"first\n\x1b[31m2026-01-01T00:00:00Z ERROR forged\r\n".to_vec();
        input.extend(std::iter::repeat_n(b'y', MAX_CHILD_LINE + 1000));
        input.extend_from_slice(b"\nlast without newline");
        let log = capture(|| {
            rt.block_on(async {
                let _ = forward_child_stderr(std::io::Cursor::new(input), "kernel", 7).await;
            })
        });
        let lines: Vec<&str> = log.lines().collect();
        assert_eq!(lines.len(), 4, "{log}");
        assert!(lines[0].contains("kernel: first pid=7"), "{log}");
        assert!(
            lines[1].contains(r"kernel: \u{1b}[31m2026-01-01T00:00:00Z ERROR forged\r"),
            "{log}"
        );
        assert!(
            lines[2].contains("[1000 more bytes]") || lines[2].contains("truncated"),
            "{log}"
        );
        assert!(
            lines[2].len() < MAX_MESSAGE_CHARS + 200,
            "{}",
            lines[2].len()
        );
        assert!(lines[3].contains("kernel: last without newline"), "{log}");
        assert!(!log.contains('\x1b'));
    }

    #[test]
    fn escape_bounded_cases() {
        assert_eq!(escape_bounded("plain text", 100), "plain text");
        assert_eq!(escape_bounded("a\r\n\tb", 100), r"a\r\n\tb");
        assert_eq!(
            escape_bounded("\x1b[0m\x7f\u{85}", 100),
            r"\u{1b}[0m\u{7f}\u{85}"
        );
        assert_eq!(escape_bounded("ünïcødé ✓", 100), "ünïcødé ✓");
        assert_eq!(
            escape_bounded("abcdef", 3),
            "abc…[truncated: 3 of 6 bytes shown]"
        );
        // an escape is never cut in half
        assert_eq!(
            escape_bounded("ab\x1b", 4),
            "ab…[truncated: 2 of 3 bytes shown]"
        );
        assert_eq!(escape_bounded("", 0), "");
    }
}
