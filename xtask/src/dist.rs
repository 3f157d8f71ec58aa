//! `cargo xtask dist`: the Debian package for a dedicated host —
//! `target/dist/gateway_<version>_<arch>.deb` with the binary, a hardened
//! systemd unit, `/etc/gateway/gateway.toml` (a conffile: the default
//! config), the man page and bash/zsh/fish completions. Built with
//! `dpkg-deb` (no cargo-deb needed).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{run_step, target_dir, workspace_root, Result};

pub fn dist() -> Result<PathBuf> {
    crate::build_gateway_any()?;
    let bin = target_dir().join("release/gateway");
    let version = output(Command::new(&bin).arg("--version"))?;
    // "gateway 0.1.0 (git abc+dirty)" → "0.1.0"
    let version = version
        .split_whitespace()
        .nth(1)
        .unwrap_or("0.0.0")
        .to_string();
    let arch = output(Command::new("dpkg").arg("--print-architecture"))
        .map(|a| a.trim().to_string())
        .unwrap_or_else(|_| "amd64".into());
    let root = target_dir()
        .join("dist")
        .join(format!("gateway_{version}_{arch}"));
    let _ = std::fs::remove_dir_all(&root);
    let put = |rel: &str, bytes: &[u8], mode: u32| -> Result {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap_or(&root))
            .map_err(|e| format!("{}: {e}", p.display()))?;
        std::fs::write(&p, bytes).map_err(|e| format!("{}: {e}", p.display()))?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))
            .map_err(|e| format!("{}: {e}", p.display()))
    };
    let read = |p: &Path| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
    put("usr/bin/gateway", &read(&bin)?, 0o755)?;
    let ws = workspace_root();
    put(
        "lib/systemd/system/gateway.service",
        &read(&ws.join("gateway/packaging/gateway.service"))?,
        0o644,
    )?;
    let config = output(Command::new(&bin).args(["config", "default"]))?;
    put("etc/gateway/gateway.toml", config.as_bytes(), 0o644)?;
    let man = output(Command::new(&bin).arg("man"))?;
    put(
        "usr/share/man/man1/gateway.1.gz",
        &gzip(man.as_bytes())?,
        0o644,
    )?;
    for (shell, rel) in [
        ("bash", "usr/share/bash-completion/completions/gateway"),
        ("zsh", "usr/share/zsh/vendor-completions/_gateway"),
        ("fish", "usr/share/fish/vendor_completions.d/gateway.fish"),
    ] {
        put(
            rel,
            output(Command::new(&bin).args(["completions", shell]))?.as_bytes(),
            0o644,
        )?;
    }
    put(
        "usr/share/doc/gateway/README.md",
        &read(&ws.join("README.md"))?,
        0o644,
    )?;
    let size_kib = std::fs::metadata(&bin).map(|m| m.len() / 1024).unwrap_or(0);
    put(
        "DEBIAN/control",
        format!(
            "Package: gateway\nVersion: {version}\nArchitecture: {arch}\nMaintainer: Inference gateway team <gateway@example.invalid>\n\
             Installed-Size: {size_kib}\nDepends: libc6\nSection: net\nPriority: optional\n\
             Description: inference gateway for GPU model servers\n \
             An XDP front door and a thread-per-core io_uring proxy in front of vLLM, SGLang,\n \
             Triton, TGI and KServe: TLS, authentication, authorization, rate limits and\n \
             quotas, OpenAI and KServe v2 validation, GPU- and prefix-cache-aware routing.\n"
        )
        .as_bytes(),
        0o644,
    )?;
    put("DEBIAN/conffiles", b"/etc/gateway/gateway.toml\n", 0o644)?;
    put(
        "DEBIAN/postinst",
        b"#!/bin/sh\nset -e\nif [ \"$1\" = configure ] && [ -d /run/systemd/system ]; then\n  systemctl daemon-reload || true\nfi\n",
        0o755,
    )?;
    let deb = target_dir()
        .join("dist")
        .join(format!("gateway_{version}_{arch}.deb"));
    run_step(
        Command::new("dpkg-deb")
            .args(["--root-owner-group", "--build"])
            .arg(&root)
            .arg(&deb),
    )?;
    println!("dist: {}", deb.display());
    Ok(deb)
}

/// Install the package on this machine (CI: a fresh one) and check it:
/// the binary runs and names its revision, the packaged config validates,
/// systemd accepts the unit.
pub fn check_installed(deb: &Path) -> Result {
    run_step(Command::new("dpkg").arg("-i").arg(deb))?;
    let v = output(Command::new("/usr/bin/gateway").arg("--version"))?;
    if !v.contains("(git ") {
        return Err(format!("`gateway --version` lacks the revision: {v}"));
    }
    run_step(Command::new("/usr/bin/gateway").args(["check-config", "/etc/gateway/gateway.toml"]))?;
    for f in [
        "/usr/share/man/man1/gateway.1.gz",
        "/usr/share/bash-completion/completions/gateway",
    ] {
        if !Path::new(f).exists() {
            return Err(format!("{f} not installed"));
        }
    }
    if crate::find_program("systemd-analyze").is_some() {
        run_step(
            Command::new("systemd-analyze").args(["verify", "/lib/systemd/system/gateway.service"]),
        )?;
    } else {
        println!("dist: systemd-analyze not found; the unit was not verified");
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Result<String> {
    let o = cmd
        .output()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    if !o.status.success() {
        return Err(format!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&o.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&o.stdout).trim_end().to_string() + "\n")
}

fn gzip(data: &[u8]) -> Result<Vec<u8>> {
    use std::io::Write;
    let mut child = Command::new("gzip")
        .args(["-9n"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run gzip: {e}"))?;
    child
        .stdin
        .take()
        .ok_or("gzip stdin")?
        .write_all(data)
        .map_err(|e| e.to_string())?;
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    Ok(out.stdout)
}
