//! Kernelspec discovery (`<data dir>/kernels/<name>/kernel.json`).
//!
//! Search order: `$JUPYTER_PATH` entries, then the configured Python's
//! `<prefix>/share/jupyter` (the environment the operator chose for kernels), then the user
//! data dir (`$JUPYTER_DATA_DIR`, `$XDG_DATA_HOME/jupyter`, `~/.local/share/jupyter`), then
//! `/usr/local/share/jupyter` and `/usr/share/jupyter`. This is jupyter_core's order except that
//! the configured prefix comes before the user dir: a worker configured with `--python` should
//! not silently pick a `python3` kernelspec from `~/.local` that points elsewhere. When `python3`
//! (or `python`) is not found anywhere we fall back, like jupyter_client's native kernel, to
//! `<python> -m ipykernel_launcher -f {connection_file}`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::KernelError;

/// A resolved kernel: what to run and how to interrupt it.
#[derive(Debug, Clone, PartialEq)]
pub struct KernelSpec {
    /// Kernel name as requested (lowercase).
    pub name: String,
    /// Where the spec was found (`None` for the built-in ipykernel fallback).
    pub resource_dir: Option<PathBuf>,
    /// argv with `{connection_file}` etc. still unexpanded.
    pub argv: Vec<String>,
    /// `display_name`.
    pub display_name: String,
    /// `language` (e.g. `python`).
    pub language: String,
    /// `"signal"` (default) or `"message"`.
    pub interrupt_mode: String,
    /// Extra environment from the spec (applied last, like jupyter_client).
    pub env: HashMap<String, String>,
}

#[derive(Deserialize)]
struct KernelJson {
    argv: Vec<String>,
    #[serde(default)]
    display_name: String,
    #[serde(default)]
    language: String,
    #[serde(default)]
    interrupt_mode: Option<String>,
    #[serde(default)]
    env: HashMap<String, String>,
}

impl KernelSpec {
    /// The spec used when no `python3` kernelspec exists: ipykernel in `python`.
    pub fn native_ipykernel(python: &Path) -> Self {
        KernelSpec {
            name: "python3".into(),
            resource_dir: None,
            argv: vec![
                python.to_string_lossy().into_owned(),
                "-m".into(),
                "ipykernel_launcher".into(),
                "-f".into(),
                "{connection_file}".into(),
            ],
            display_name: "Python 3 (ipykernel)".into(),
            language: "python".into(),
            interrupt_mode: "signal".into(),
            env: HashMap::new(),
        }
    }

    /// Reads `<dir>/kernel.json`.
    pub fn from_dir(name: &str, dir: &Path) -> Result<Self, KernelError> {
        let path = dir.join("kernel.json");
        let text = std::fs::read(&path)
            .map_err(|e| KernelError::Spec(format!("{}: {e}", path.display())))?;
        let kj: KernelJson = serde_json::from_slice(&text)
            .map_err(|e| KernelError::Spec(format!("{}: {e}", path.display())))?;
        if kj.argv.is_empty() {
            return Err(KernelError::Spec(format!("{}: empty argv", path.display())));
        }
        Ok(KernelSpec {
            name: name.to_string(),
            resource_dir: Some(dir.to_path_buf()),
            argv: kj.argv,
            display_name: kj.display_name,
            language: kj.language,
            interrupt_mode: kj.interrupt_mode.unwrap_or_else(|| "signal".into()),
            env: kj.env,
        })
    }

    /// True for IPython kernels (they get `--HistoryManager.hist_file=:memory:` like nbclient).
    pub fn is_ipykernel(&self) -> bool {
        self.language.eq_ignore_ascii_case("python")
            && self.argv.iter().any(|a| a.contains("ipykernel"))
    }

    /// argv with `{connection_file}`, `{resource_dir}` and `{prefix}` substituted.
    pub fn expand_argv(&self, connection_file: &Path, python_prefix: Option<&Path>) -> Vec<String> {
        let cf = connection_file.to_string_lossy();
        let rd = self
            .resource_dir
            .as_ref()
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        let prefix = python_prefix
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        self.argv
            .iter()
            .map(|a| {
                a.replace("{connection_file}", &cf)
                    .replace("{resource_dir}", &rd)
                    .replace("{prefix}", &prefix)
            })
            .collect()
    }
}

/// `<prefix>` of a Python interpreter path `<prefix>/bin/python*` (venvs included; the path is
/// not canonicalised because a venv's python is a symlink to the base interpreter).
pub fn python_prefix(python: &Path) -> Option<PathBuf> {
    let bin = python.parent()?;
    if bin.file_name()? == "bin" {
        bin.parent().map(Path::to_path_buf)
    } else {
        None
    }
}

/// Jupyter data directories in search order (see the module docs).
pub fn jupyter_data_dirs(python: Option<&Path>) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(jp) = std::env::var_os("JUPYTER_PATH") {
        dirs.extend(std::env::split_paths(&jp).filter(|p| !p.as_os_str().is_empty()));
    }
    if let Some(prefix) = python.and_then(python_prefix) {
        dirs.push(prefix.join("share").join("jupyter"));
    }
    if let Some(d) = std::env::var_os("JUPYTER_DATA_DIR") {
        dirs.push(PathBuf::from(d));
    } else if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|x| !x.is_empty()) {
        dirs.push(PathBuf::from(x).join("jupyter"));
    } else if let Some(home) = std::env::var_os("HOME") {
        dirs.push(PathBuf::from(home).join(".local/share/jupyter"));
    }
    dirs.push(PathBuf::from("/usr/local/share/jupyter"));
    dirs.push(PathBuf::from("/usr/share/jupyter"));
    dirs
}

/// Finds kernelspec `name` (case-insensitive) for a worker whose kernels use `python`.
pub fn find_kernelspec(name: &str, python: &Path) -> Result<KernelSpec, KernelError> {
    let wanted = name.to_lowercase();
    for dir in jupyter_data_dirs(Some(python)) {
        let kernels = dir.join("kernels");
        let Ok(entries) = std::fs::read_dir(&kernels) else {
            continue;
        };
        for entry in entries.flatten() {
            let fname = entry.file_name().to_string_lossy().to_lowercase();
            if fname == wanted && entry.path().join("kernel.json").is_file() {
                return KernelSpec::from_dir(&wanted, &entry.path());
            }
        }
    }
    if wanted == "python3" || wanted == "python" {
        return Ok(KernelSpec::native_ipykernel(python));
    }
    Err(KernelError::NoSuchKernel(name.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_of_venv_python() {
        assert_eq!(
            python_prefix(Path::new("/opt/venv/bin/python3")),
            Some(PathBuf::from("/opt/venv"))
        );
        assert_eq!(python_prefix(Path::new("python3")), None);
    }

    #[test]
    fn fallback_and_missing() {
        let py = Path::new("/nonexistent/bin/python3");
        let spec = find_kernelspec("Python3", py).expect("fallback");
        assert!(spec.is_ipykernel());
        assert!(matches!(
            find_kernelspec("no-such-kernel-xyz", py),
            Err(KernelError::NoSuchKernel(_))
        ));
    }
}
