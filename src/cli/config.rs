//! `config show`, `config check` and `man`: the configuration and the manual, offline.

use super::{Cli, Exit, Failure};
use crate::config::ConfigSource;

#[derive(Debug, clap::Subcommand)]
pub enum ConfigAction {
    /// The effective configuration after defaults, the file and the environment, each value with
    /// where it came from (default, file, env); every secret shown as [redacted].
    Show {
        /// Print as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Validate the configuration without touching the network or the database: exit 0 when it
    /// is valid, 78 naming the problem when not.
    Check,
}

/// `config show` and `config check`: offline, no database, no network.
pub fn config_command(source: &ConfigSource, action: ConfigAction) -> Result<Exit, Failure> {
    let explained = crate::config::show::explain(source)?;
    for warning in &explained.warnings {
        eprintln!("warning: {warning}");
    }
    match action {
        ConfigAction::Show { json: true } => println!(
            "{}",
            serde_json::to_string_pretty(&explained).map_err(anyhow::Error::from)?
        ),
        ConfigAction::Show { json: false } => {
            print!("{}", crate::config::show::render_text(&explained))
        }
        ConfigAction::Check => println!(
            "configuration valid ({}; {} warning(s))",
            explained.file.as_deref().map_or_else(
                || "no config file, environment only".to_owned(),
                |f| format!("file {f}")
            ),
            explained.warnings.len()
        ),
    }
    Ok(Exit::Ok)
}

/// The manual page: the main page, then a section per subcommand (nested ones too) with its
/// synopsis, description and options.
pub fn print_man_page() -> std::io::Result<()> {
    use std::io::Write;
    let command = <Cli as clap::CommandFactory>::command();
    let mut out = Vec::new();
    clap_mangen::Man::new(command.clone()).render(&mut out)?;
    fn sections(out: &mut Vec<u8>, parent: &str, command: &clap::Command) -> std::io::Result<()> {
        for sub in command.get_subcommands().filter(|c| c.get_name() != "help") {
            let name = format!("{parent} {}", sub.get_name());
            writeln!(out, ".SH \"{}\"", name.to_uppercase())?;
            let man = clap_mangen::Man::new(sub.clone().bin_name(name.clone()));
            man.render_synopsis_section(out)?;
            man.render_description_section(out)?;
            man.render_options_section(out)?;
            sections(out, &name, sub)?;
        }
        Ok(())
    }
    sections(&mut out, "bynder-usage-sync", &command)?;
    std::io::stdout().write_all(&out)
}
