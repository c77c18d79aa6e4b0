//! `segq config init` and `segq config show`.

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::Subcommand;

use super::{GlobalArgs, load_config};

#[derive(Subcommand, Debug)]
pub enum ConfigCommand {
    /// Write a commented default segq.toml.
    Init {
        /// Where to write it.
        #[arg(default_value = "segq.toml")]
        path: PathBuf,
        /// Replace an existing file.
        #[arg(long)]
        force: bool,
    },
    /// Print the merged configuration (defaults < file < --set); never shows secrets.
    Show,
}

pub fn run(global: &GlobalArgs, cmd: ConfigCommand) -> Result<()> {
    match cmd {
        ConfigCommand::Init { path, force } => {
            if path.exists() && !force {
                bail!("{}: already exists (use --force to replace it)", path.display());
            }
            std::fs::write(&path, segq::config::DEFAULT_FILE).map_err(|e| segq::Error::io(&path, e))?;
            tracing::info!(path = %path.display(), "wrote default configuration");
            Ok(())
        }
        ConfigCommand::Show => {
            let config = load_config(global)?;
            print!("{}", config.to_toml());
            Ok(())
        }
    }
}
