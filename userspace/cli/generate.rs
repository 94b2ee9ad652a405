//! `--generate`: the man page and the shell completions, made from the flags themselves
//! (clap_mangen, clap_complete), so that they never drift from `--help`. The packages
//! (ci/package.sh) ship what this writes.

use std::io::Write;

use clap::CommandFactory;
use clap_complete::Shell;

use super::flags::Cli;

/// What `--generate` writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Generate {
    /// tcpconnlat.8
    Man,
    CompleteBash,
    CompleteZsh,
    CompleteFish,
}

/// Write it to `out`.
pub fn generate(what: Generate, out: &mut impl Write) -> std::io::Result<()> {
    let mut command = Cli::command();
    let shell = match what {
        Generate::Man => {
            return clap_mangen::Man::new(command)
                .section("8")
                .manual("System Administration")
                .render(out);
        }
        Generate::CompleteBash => Shell::Bash,
        Generate::CompleteZsh => Shell::Zsh,
        Generate::CompleteFish => Shell::Fish,
    };
    clap_complete::generate(shell, &mut command, "tcpconnlat", out);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(what: Generate) -> String {
        let mut out = Vec::new();
        generate(what, &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    /// Every flag --help shows is in the man page and each completion; the hidden ones are
    /// not in the man page.
    #[test]
    fn the_man_page_and_completions_hold_every_visible_flag() {
        let command = Cli::command();
        let visible: Vec<String> = command
            .get_arguments()
            .filter(|a| !a.is_hide_set())
            .filter_map(|a| a.get_long().map(str::to_owned))
            .collect();
        assert!(visible.len() > 30, "{visible:?}");
        let man = text(Generate::Man);
        assert!(
            man.starts_with(".ie") || man.contains(".TH tcpconnlat 8"),
            "{man}"
        );
        for what in [
            Generate::Man,
            Generate::CompleteBash,
            Generate::CompleteZsh,
            Generate::CompleteFish,
        ] {
            let text = text(what);
            for long in &visible {
                // roff escapes the dashes of the man page.
                let flag = format!("--{long}");
                let shown = [flag.replace('-', "\\-"), flag, long.clone()];
                assert!(
                    shown.iter().any(|s| text.contains(s.as_str())),
                    "{what:?} lacks --{long}"
                );
            }
        }
        // The hidden test flags stay out of the man page (clap_complete offers every flag).
        assert!(!man.contains("pin\\-maps") && !man.contains("sweep\\-after"));
    }
}
