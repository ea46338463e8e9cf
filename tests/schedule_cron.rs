//! `schedule::cron::next_after` against the venv's real croniter 7, on
//! generated and hand-picked 5-field expressions and base times: the same
//! next time, or the same verdict (bad expression / no next date).
//!
//! Needs `.venv/bin/python` with croniter (scripts/setup-venv.sh); fails
//! loudly without it.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use chrono::{Duration, NaiveDate, NaiveDateTime};
use om_worker::schedule::cron::{next_after, CronError};

const PY: &str = r#"
import json, sys, datetime
from croniter import croniter, CroniterBadCronError, CroniterBadDateError
out = []
for expr, base in json.load(sys.stdin):
    b = datetime.datetime.fromisoformat(base)
    try:
        out.append(["ok", croniter(expr, b).get_next(datetime.datetime).isoformat()])
    except CroniterBadDateError as e:
        out.append(["nodate", str(e)])
    except (CroniterBadCronError, ValueError, KeyError, TypeError, IndexError) as e:
        out.append(["bad", type(e).__name__ + ": " + str(e)])
print(json.dumps(out))
"#;

fn venv_python() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    assert!(
        p.exists(),
        "{} missing: run scripts/setup-venv.sh (croniter is needed for this test)",
        p.display()
    );
    p
}

fn croniter(cases: &[(String, NaiveDateTime)]) -> Vec<(String, String)> {
    let input: Vec<(String, String)> = cases
        .iter()
        .map(|(e, b)| (e.clone(), b.format("%Y-%m-%dT%H:%M:%S%.6f").to_string()))
        .collect();
    let mut child = Command::new(venv_python())
        .args(["-c", PY])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("run venv python");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(&serde_json::to_vec(&input).expect("json"))
        .expect("write cases");
    let out = child.wait_with_output().expect("python finished");
    assert!(out.status.success(), "croniter script failed");
    serde_json::from_slice(&out.stdout).expect("croniter output is JSON")
}

/// xorshift: reproducible cases without a rand dependency in the test.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const MONTHS: [&str; 12] = [
    "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
];
const DAYS: [&str; 7] = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"];

fn gen_element(r: &mut Rng, idx: usize) -> String {
    let (min, max) = [(0u64, 59u64), (0, 23), (1, 31), (1, 12), (0, 6)][idx];
    let span = max - min + 1;
    let v = |r: &mut Rng| min + r.below(span);
    let name = |r: &mut Rng, v: u64| -> String {
        match idx {
            3 if r.below(2) == 0 => MONTHS[(v - 1) as usize].to_owned(),
            4 if r.below(2) == 0 => DAYS[v as usize].to_owned(),
            4 if v == 0 && r.below(3) == 0 => "7".to_owned(),
            _ => v.to_string(),
        }
    };
    match r.below(11) {
        0 => "*".into(),
        1 | 2 => {
            let x = v(r);
            name(r, x)
        }
        3 | 4 => {
            let (a, b) = (v(r), v(r));
            let (a, b) = (a.min(b), a.max(b));
            format!("{}-{}", name(r, a), name(r, b))
        }
        5 => {
            let (a, b) = (v(r), v(r));
            let (a, b) = (a.min(b), a.max(b));
            format!("{a}-{b}/{}", 1 + r.below(span.min(15)))
        }
        6 => format!("*/{}", 1 + r.below(span.min(20))),
        7 => format!("{}/{}", v(r), 1 + r.below(span.min(15))),
        8 => {
            // wrapped range, maybe with a step
            let (a, b) = (v(r), v(r));
            let (a, b) = (a.max(b), a.min(b));
            if r.below(2) == 0 {
                format!("{a}-{b}")
            } else {
                format!("{a}-{b}/{}", 1 + r.below(span.min(15)))
            }
        }
        9 => {
            let x = v(r);
            format!("{x}-{x}")
        }
        _ => match idx {
            2 if r.below(2) == 0 => "l".into(),
            2 | 4 if r.below(2) == 0 => "?".into(),
            _ => v(r).to_string(),
        },
    }
}

fn gen_field(r: &mut Rng, idx: usize) -> String {
    let n = 1 + r.below(3) as usize * usize::from(r.below(2) == 0);
    (0..n)
        .map(|_| gen_element(r, idx))
        .collect::<Vec<_>>()
        .join(",")
}

fn gen_expr(r: &mut Rng) -> String {
    (0..5)
        .map(|i| {
            // keep many fields simple so matches stay findable and varied
            let star_odds = if i < 2 { 5 } else { 3 };
            if r.below(9) < star_odds {
                "*".to_owned()
            } else {
                gen_field(r, i)
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn gen_base(r: &mut Rng) -> NaiveDateTime {
    let start = NaiveDate::from_ymd_opt(2000, 1, 1)
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .expect("date");
    let secs = r.below(40 * 365 * 86_400) as i64;
    let micros = match r.below(3) {
        0 => 0,
        _ => r.below(1_000_000) as i64,
    };
    start + Duration::seconds(secs) + Duration::microseconds(micros)
}

fn compare(cases: Vec<(String, NaiveDateTime)>) -> usize {
    let want = croniter(&cases);
    assert_eq!(want.len(), cases.len());
    let mut mismatches = Vec::new();
    let mut ok = 0;
    for ((expr, base), (kind, value)) in cases.iter().zip(want) {
        let got = next_after(expr, *base);
        let same = match (kind.as_str(), &got) {
            ("ok", Ok(t)) => {
                let py = NaiveDateTime::parse_from_str(&value, "%Y-%m-%dT%H:%M:%S")
                    .expect("croniter iso");
                ok += 1;
                *t == py
            }
            ("nodate", Err(CronError::NoNextDate(_))) => true,
            ("bad", Err(CronError::Invalid { .. })) => true,
            // 6/7 columns (seconds, year) are refused outright, valid or not
            (_, Err(CronError::Unsupported { .. })) => expr.split_whitespace().count() != 5,
            _ => false,
        };
        if !same {
            mismatches.push(format!(
                "{expr:?} from {base}: croniter {kind} {value}, ours {got:?}"
            ));
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} of {} cases differ from croniter:\n{}",
        mismatches.len(),
        cases.len(),
        mismatches
            .iter()
            .take(40)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    ok
}

#[test]
fn hand_picked_expressions_match_croniter() {
    let exprs = [
        "* * * * *",
        "*/5 * * * *",
        "0 * * * *",
        "0 0 * * *",
        "0 9 * * mon-fri",
        "30 6 1,15 * *",
        "0 0 15 * mon",
        "0 0 1-31 * mon",
        "0 0 * * 0-6",
        "0 0 */2 * sun",
        "0 0 1 jan,jul *",
        "0 0 29 2 *",
        "0 0 30 2 *",
        "0 0 31 4 *",
        "0 0 31 * *",
        "0 0 l * *",
        "0 0 l 2 *",
        "5-5 * * * *",
        "0 0 * * 1-1",
        "59/15 * * * *",
        "10/5 * * * *",
        "50-10/15 * * * *",
        "0 22-2 * * *",
        "0 0 * * fri-mon",
        "0 0 * nov-feb *",
        "0 0 * * 5-7",
        "0 0 * * 7",
        "0 0 ? * mon",
        "0 0 1 * ?",
        "@hourly",
        "@daily",
        "@weekly",
        "@monthly",
        "@yearly",
        "*,5 * * * *",
        "0 0 *,1 * mon",
        "61 * * * *",
        "0 24 * * *",
        "0 0 0 * *",
        "0 0 * 13 *",
        "0 0 * * 8",
        "*/0 * * * *",
        "a * * * *",
        "0 0 * * * * *x",
        "0 0 * * * 30",
        "0 0 *",
        "-1 * * * *",
        "1-70 * * * *",
        "0 0 1 JAN *",
        "0 0 * * MON",
        "0 0 * * mon,wed-fri/2",
    ];
    let bases = [
        "2024-01-01 00:00:00",
        "2024-02-28 23:59:59.999999",
        "2024-02-29 12:00:00",
        "2023-12-31 23:59:00",
        "2025-06-15 10:00:30.5",
        "2026-03-31 00:01:00",
    ];
    let mut cases = Vec::new();
    for e in exprs {
        for b in bases {
            let b = NaiveDateTime::parse_from_str(b, "%Y-%m-%d %H:%M:%S%.f").expect("base");
            cases.push((e.to_owned(), b));
        }
    }
    compare(cases);
}

#[test]
fn generated_expressions_match_croniter() {
    let mut r = Rng(0x9e37_79b9_7f4a_7c15);
    let cases: Vec<(String, NaiveDateTime)> = (0..10_000)
        .map(|_| (gen_expr(&mut r), gen_base(&mut r)))
        .collect();
    let ok = compare(cases);
    assert!(ok > 5000, "too few valid cases generated ({ok})");
}
