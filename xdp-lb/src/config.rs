//! `xdp-lb balance --config FILE`: a TOML file whose keys are the subcommand's long flag names,
//! expanded into command-line arguments before clap parses them.
//!
//! ```toml
//! vip = "10.0.0.100"
//! backend = ["10.0.0.11:7000", "10.0.0.12:7000"]
//! iface = ["eth0"]
//! dead-after-ms = 100
//! ```
//!
//! Every key becomes `--key value` (an array: one `--key value` per element; `true` for a flag
//! without value: `--key`, `false`: nothing), inserted right after the subcommand, so clap
//! checks and converts the values exactly as it does on the command line. A key the command
//! line also gives is left out: the command line wins, for lists too (its `--backend`s replace
//! the file's instead of adding to them). Unknown keys are an error naming the key.

use std::ffi::OsString;

use anyhow::{Context as _, bail};
use clap::{Arg, Command};

/// The flag that names the file.
const FLAG: &str = "config";

/// Subcommands that accept `--config`.
pub const SUBCOMMANDS: &[&str] = &["balance", "switch"];

/// Adds `--config FILE` to the subcommands that read a configuration file, for `--help` and so
/// that clap accepts it after the expansion.
#[must_use]
pub fn with_config_flag(mut command: Command) -> Command {
    for &name in SUBCOMMANDS {
        if command.find_subcommand(name).is_none() {
            continue;
        }
        command = command.mut_subcommand(name, |sub| {
            sub.arg(
                Arg::new(FLAG)
                    .long(FLAG)
                    .value_name("FILE")
                    .value_parser(clap::value_parser!(std::path::PathBuf))
                    .help("Read options from a TOML file: keys are the long option names (`vip = \"10.0.0.1\"`, `backend = [\"10.0.0.2:7000\"]`, `dead-after-ms = 100`); options given on the command line win"),
            )
        });
    }
    command
}

/// Expands `--config FILE` in `args` (the whole command line, program name first) into the
/// file's options, placed after the subcommand and before the command line's own. The
/// arguments are returned unchanged when there is no `--config`.
pub fn expand(args: Vec<OsString>, command: &Command) -> anyhow::Result<Vec<OsString>> {
    let Some((path, subcommand_at)) = find_config(&args)? else {
        return Ok(args);
    };
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read the configuration file {}", path.display()))?;
    let subcommand_name = args[subcommand_at].to_string_lossy().into_owned();
    let subcommand = command
        .find_subcommand(&subcommand_name)
        .with_context(|| format!("--config is not supported by `{subcommand_name}`"))?;
    let given = given_flags(&args[subcommand_at + 1..]);
    let from_file = file_arguments(&text, command, subcommand, &given)
        .with_context(|| format!("in the configuration file {}", path.display()))?;
    let mut expanded = args;
    expanded.splice((subcommand_at + 1)..=subcommand_at, from_file);
    Ok(expanded)
}

/// The path after `--config` and the index of the subcommand it follows, if any.
fn find_config(args: &[OsString]) -> anyhow::Result<Option<(std::path::PathBuf, usize)>> {
    let mut found = None;
    let mut subcommand_at = None;
    let mut i = 1;
    while i < args.len() {
        let arg = args[i].to_string_lossy();
        if arg == "--" {
            break;
        }
        if subcommand_at.is_none() && SUBCOMMANDS.contains(&arg.as_ref()) {
            subcommand_at = Some(i);
        }
        let value = if arg == "--config" {
            i += 1;
            Some(args.get(i).context("--config needs a FILE")?.into())
        } else {
            arg.strip_prefix("--config=").map(std::path::PathBuf::from)
        };
        if let Some(path) = value {
            let at = subcommand_at.with_context(|| format!("--config goes after the subcommand ({})", SUBCOMMANDS.join(", ")))?;
            if found.is_some() {
                bail!("--config given more than once");
            }
            found = Some((path, at));
        }
        i += 1;
    }
    Ok(found)
}

/// Long flags present in `args` (`--name` or `--name=value`).
fn given_flags(args: &[OsString]) -> Vec<String> {
    args.iter()
        .map(|arg| arg.to_string_lossy())
        .take_while(|arg| arg != "--")
        .filter_map(|arg| Some(arg.strip_prefix("--")?.split('=').next()?.to_owned()))
        .collect()
}

/// The arguments for the file's keys, skipping keys in `given`.
fn file_arguments(text: &str, root: &Command, subcommand: &Command, given: &[String]) -> anyhow::Result<Vec<OsString>> {
    let table: toml::Table = text.parse().context("not valid TOML")?;
    let mut out = Vec::new();
    for (key, value) in &table {
        let arg = find_arg(root, subcommand, key)?;
        if given.iter().any(|g| g == key) {
            continue;
        }
        let flag = OsString::from(format!("--{key}"));
        let takes_value = arg.get_action().takes_values();
        let items: Vec<&toml::Value> = match value {
            toml::Value::Array(items) => items.iter().collect(),
            single => vec![single],
        };
        for item in items {
            match (item, takes_value) {
                (toml::Value::Boolean(true), false) => out.push(flag.clone()),
                (toml::Value::Boolean(false), false) => {}
                (_, false) => bail!("`{key}` is a switch: set it to true or false"),
                (toml::Value::Array(_) | toml::Value::Table(_), true) => {
                    bail!("`{key}`: expected a value or an array of values, found a nested array or table")
                }
                (toml::Value::String(s), true) => out.extend([flag.clone(), s.into()]),
                (toml::Value::Integer(n), true) => out.extend([flag.clone(), n.to_string().into()]),
                (toml::Value::Float(x), true) => out.extend([flag.clone(), x.to_string().into()]),
                (toml::Value::Boolean(b), true) => out.extend([flag.clone(), b.to_string().into()]),
                (toml::Value::Datetime(d), true) => out.extend([flag.clone(), d.to_string().into()]),
            }
        }
    }
    Ok(out)
}

/// The argument a key names: a long flag of the subcommand or a global one of the root.
fn find_arg<'a>(root: &'a Command, subcommand: &'a Command, key: &str) -> anyhow::Result<&'a Arg> {
    let long = |arg: &&Arg| arg.get_long() == Some(key) && key != FLAG;
    subcommand
        .get_arguments()
        .find(long)
        .or_else(|| root.get_arguments().filter(|a| a.is_global_set()).find(long))
        .with_context(|| {
            let globals = root.get_arguments().filter(|a| a.is_global_set());
            let mut known: Vec<&str> =
                subcommand.get_arguments().chain(globals).filter_map(Arg::get_long).filter(|l| *l != FLAG && *l != "help").collect();
            known.sort_unstable();
            format!("unknown key `{key}` (keys are the long options of `{}`: {})", subcommand.get_name(), known.join(", "))
        })
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use clap::{CommandFactory as _, FromArgMatches as _, Parser};

    use super::*;

    /// A stand-in for the real CLI, same shape: a global option and a subcommand with scalars,
    /// lists and a switch.
    #[derive(Parser, Debug)]
    #[command(args_override_self = true)]
    struct Cli {
        #[arg(long, global = true, default_value = "/sys/fs/bpf/xdp-lb")]
        pin_root: String,
        #[command(subcommand)]
        command: Sub,
    }

    #[derive(clap::Subcommand, Debug)]
    enum Sub {
        Balance {
            #[arg(long = "iface", required = true)]
            interfaces: Vec<String>,
            #[arg(long)]
            vip: std::net::Ipv4Addr,
            #[arg(long = "backend", required = true)]
            backends: Vec<std::net::SocketAddrV4>,
            #[arg(long, default_value_t = 100)]
            dead_after_ms: u64,
            #[arg(long)]
            verbose: bool,
        },
        Status,
    }

    struct Parsed {
        interfaces: Vec<String>,
        vip: String,
        backends: Vec<String>,
        dead_after_ms: u64,
        verbose: bool,
        pin_root: String,
    }

    /// A configuration file in the temporary directory, removed on drop.
    struct ConfigFile(PathBuf);

    impl ConfigFile {
        fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for ConfigFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn config_file(text: &str) -> ConfigFile {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("xdp-lb-config-test-{}-{n}.toml", std::process::id()));
        std::fs::write(&path, text).unwrap();
        ConfigFile(path)
    }

    fn expand_with(file: &ConfigFile, args: &[&str]) -> anyhow::Result<Vec<OsString>> {
        let mut full: Vec<OsString> = vec!["xdp-lb".into()];
        full.extend(args.iter().map(|a| OsString::from(a.replace("FILE", &file.path().display().to_string()))));
        expand(full, &with_config_flag(Cli::command()))
    }

    fn parse(file: &ConfigFile, args: &[&str]) -> anyhow::Result<Parsed> {
        let expanded = expand_with(file, args)?;
        let matches = with_config_flag(Cli::command()).try_get_matches_from(expanded)?;
        let cli = Cli::from_arg_matches(&matches)?;
        let Sub::Balance { interfaces, vip, backends, dead_after_ms, verbose } = cli.command else { panic!("not balance") };
        Ok(Parsed {
            interfaces,
            vip: vip.to_string(),
            backends: backends.iter().map(ToString::to_string).collect(),
            dead_after_ms,
            verbose,
            pin_root: cli.pin_root,
        })
    }

    const FULL: &str = r#"
        vip = "10.0.0.1"
        backend = ["10.0.0.2:7000", "10.0.0.3:7000"]
        iface = ["eth0", "eth1"]
        dead-after-ms = 250
        verbose = true
        pin-root = "/sys/fs/bpf/other"
    "#;

    #[test]
    fn file_values_reach_the_parser() {
        let file = config_file(FULL);
        let p = parse(&file, &["balance", "--config", "FILE"]).unwrap();
        assert_eq!(p.vip, "10.0.0.1");
        assert_eq!(p.backends, ["10.0.0.2:7000", "10.0.0.3:7000"]);
        assert_eq!(p.interfaces, ["eth0", "eth1"]);
        assert_eq!(p.dead_after_ms, 250);
        assert!(p.verbose);
        assert_eq!(p.pin_root, "/sys/fs/bpf/other");
    }

    #[test]
    fn expansion_goes_after_the_subcommand_before_the_command_line() {
        let file = config_file("vip = \"10.0.0.1\"\nbackend = [\"10.0.0.2:7000\", \"10.0.0.3:7000\"]\n");
        let args = expand_with(&file, &["--pin-root", "/x", "balance", "--iface", "eth0", "--config=FILE"]).unwrap();
        let args: Vec<String> = args.iter().map(|a| a.to_string_lossy().into_owned()).collect();
        assert_eq!(&args[..4], ["xdp-lb", "--pin-root", "/x", "balance"]);
        assert_eq!(&args[4..10], ["--backend", "10.0.0.2:7000", "--backend", "10.0.0.3:7000", "--vip", "10.0.0.1"]);
        assert_eq!(&args[10..12], ["--iface", "eth0"]);
    }

    #[test]
    fn the_command_line_overrides_the_file() {
        let file = config_file(FULL);
        let p = parse(
            &file,
            &["balance", "--dead-after-ms", "40", "--config", "FILE", "--backend", "10.9.9.9:69", "--vip=10.0.0.7"],
        )
        .unwrap();
        assert_eq!(p.dead_after_ms, 40, "scalar from the command line");
        assert_eq!(p.vip, "10.0.0.7", "--key=value form counts too");
        assert_eq!(p.backends, ["10.9.9.9:69"], "a list on the command line replaces the file's");
        assert_eq!(p.interfaces, ["eth0", "eth1"], "keys the command line does not give come from the file");
    }

    #[test]
    fn unknown_keys_are_errors_naming_the_key() {
        let file = config_file("vip = \"10.0.0.1\"\nbackends = [\"10.0.0.2:7000\"]\n");
        let error = format!("{:#}", expand_with(&file, &["balance", "--config", "FILE"]).unwrap_err());
        assert!(error.contains("unknown key `backends`"), "{error}");
        assert!(error.contains("backend, "), "lists the known keys: {error}");
        assert!(error.contains(&file.path().display().to_string()), "names the file: {error}");
        // `config` itself is not a key.
        let file = config_file("config = \"other.toml\"\n");
        assert!(expand_with(&file, &["balance", "--config", "FILE"]).is_err());
    }

    #[test]
    fn bad_values_and_files_are_errors() {
        let nested = config_file("backend = [[\"10.0.0.2:7000\"]]\n");
        assert!(format!("{:#}", expand_with(&nested, &["balance", "--config", "FILE"]).unwrap_err()).contains("nested"));
        let switch = config_file("verbose = \"yes\"\n");
        assert!(format!("{:#}", expand_with(&switch, &["balance", "--config", "FILE"]).unwrap_err()).contains("switch"));
        let broken = config_file("vip = \n");
        assert!(format!("{:#}", expand_with(&broken, &["balance", "--config", "FILE"]).unwrap_err()).contains("TOML"));
        // A value clap rejects is rejected as on the command line.
        let bad_ip = config_file("vip = \"not-an-ip\"\niface = [\"eth0\"]\nbackend = [\"10.0.0.2:7000\"]\n");
        assert!(parse(&bad_ip, &["balance", "--config", "FILE"]).is_err());
        let missing = expand(
            vec!["xdp-lb".into(), "balance".into(), "--config".into(), "/nonexistent/xdp-lb.toml".into()],
            &with_config_flag(Cli::command()),
        );
        assert!(format!("{:#}", missing.unwrap_err()).contains("cannot read the configuration file"));
    }

    #[test]
    fn without_config_nothing_changes() {
        let args: Vec<OsString> = ["xdp-lb", "status", "--json"].iter().map(OsString::from).collect();
        assert_eq!(expand(args.clone(), &with_config_flag(Cli::command())).unwrap(), args);
        let before: Vec<OsString> = ["xdp-lb", "--config", "x"].iter().map(OsString::from).collect();
        assert!(expand(before, &with_config_flag(Cli::command())).is_err(), "--config before the subcommand");
    }

    #[test]
    fn the_control_key_options_come_from_the_file_for_both_agents() {
        let file = config_file("control-key-file = \"/etc/xdp-lb/control.key\"\ncontrol-max-skew-ms = 5000\n");
        let command = with_config_flag(crate::Cli::command());
        let expand_with = |file: &ConfigFile, args: &[&str]| {
            let mut full: Vec<OsString> = vec!["xdp-lb".into()];
            full.extend(args.iter().map(|a| OsString::from(a.replace("FILE", &file.path().display().to_string()))));
            expand(full, &command)
        };
        for args in [
            &["balance", "--iface", "eth0", "--vip", "10.0.0.1", "--backend", "10.0.0.2:7000", "--config", "FILE"][..],
            &["switch", "--iface", "eth0", "--lb-iface", "eth0", "--vip", "10.0.0.1", "--lb", "10.0.0.2:6970", "--lb", "10.0.0.3:6970", "--config", "FILE"],
        ] {
            let matches = command.clone().try_get_matches_from(expand_with(&file, args).unwrap()).unwrap();
            let sub = matches.subcommand_matches(args[0]).unwrap();
            assert_eq!(sub.get_one::<PathBuf>("control_key_file").unwrap(), Path::new("/etc/xdp-lb/control.key"), "{}", args[0]);
            assert_eq!(sub.get_one::<u64>("control_max_skew_ms"), Some(&5000));
            assert!(!sub.get_flag("insecure_control"));
        }
        let insecure = config_file("insecure-control = true\n");
        let args = ["balance", "--iface", "eth0", "--vip", "10.0.0.1", "--backend", "10.0.0.2:7000", "--config", "FILE"];
        let matches = command.clone().try_get_matches_from(expand_with(&insecure, &args).unwrap()).unwrap();
        assert!(matches.subcommand_matches("balance").unwrap().get_flag("insecure_control"));
    }

    #[test]
    fn the_example_file_is_valid_for_the_real_cli() {
        let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/xdp-lb.example.toml");
        let args: Vec<OsString> = ["xdp-lb", "balance", "--config", example].iter().map(OsString::from).collect();
        let command = with_config_flag(crate::Cli::command());
        let expanded = expand(args, &command).unwrap();
        let matches = command.try_get_matches_from(expanded).unwrap();
        crate::Cli::from_arg_matches(&matches).unwrap();
    }
}
