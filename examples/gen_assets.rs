//! Generates the man pages and shell completions the Debian package ships, from the same
//! clap definition the binary parses with, so they can never drift from `vigil --help`:
//!
//! ```text
//! cargo run --example gen_assets [OUT_DIR]      # default target/assets
//! ```
//!
//! Writes `OUT_DIR/man/vigil.1` plus one `vigil-SUB.1` per subcommand (`vigil-image-prep.1`
//! for nested ones), and `OUT_DIR/completions/{vigil.bash,_vigil,vigil.fish}`. The
//! packaging script (`.ci/package`) runs it before `cargo deb`; an example rather than a
//! `build.rs` keeps the normal build free of the generators, and rather than a hidden
//! subcommand keeps them out of the shipped binary.

use std::io;
use std::path::{Path, PathBuf};

use clap::CommandFactory;
use clap_complete::Shell;
use vigil::cli::Cli;

fn main() -> io::Result<()> {
    let out = std::env::args_os()
        .nth(1)
        .map_or_else(|| PathBuf::from("target/assets"), PathBuf::from);
    let man = out.join("man");
    let completions = out.join("completions");
    std::fs::create_dir_all(&man)?;
    std::fs::create_dir_all(&completions)?;

    let mut cmd = Cli::command();
    // Subcommands get their full names ("vigil image prep") only once built.
    cmd.build();
    write_man(&cmd, &man)?;

    for (shell, name) in [
        (Shell::Bash, "vigil.bash"),
        (Shell::Zsh, "_vigil"),
        (Shell::Fish, "vigil.fish"),
    ] {
        let mut buf = Vec::new();
        clap_complete::generate(shell, &mut Cli::command(), "vigil", &mut buf);
        std::fs::write(completions.join(name), buf)?;
    }
    println!("{}", out.display());
    Ok(())
}

/// Writes the page of `cmd` and, recursively, of each of its subcommands.
fn write_man(cmd: &clap::Command, dir: &Path) -> io::Result<()> {
    // A subcommand's page is named after its display name's dashed form
    // ("vigil-image-prep"), as git and cargo name theirs.
    let page_name = cmd
        .get_display_name()
        .unwrap_or_else(|| cmd.get_name())
        .replace(' ', "-");
    let mut buf = Vec::new();
    clap_mangen::Man::new(cmd.clone())
        .title(page_name.to_uppercase())
        .render(&mut buf)?;
    std::fs::write(dir.join(format!("{page_name}.1")), buf)?;
    for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
        write_man(sub, dir)?;
    }
    Ok(())
}
