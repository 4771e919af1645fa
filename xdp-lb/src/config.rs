//! `xdp-lb balance --config FILE` (and `switch`): a TOML file whose keys are the subcommand's
//! long option names, read into the same typed options as the command line.
//!
//! ```toml
//! vip = "10.0.0.100"
//! backend = ["10.0.0.11:7000", "10.0.0.12:7000"]
//! iface = ["eth0"]
//! dead-after-ms = 100
//! ```
//!
//! The options structs are clap's and serde's at once, their serde names the long option names.
//! clap parses the command line (with the subcommand's required options relaxed, the file may
//! give them); the result is serialized, every file key the command line did not give (long,
//! `--key=value` or short form: clap's own record of where a value came from) replaces its
//! value, and serde reads the result back. So the command line wins, for lists too (its
//! `--backend`s replace the file's instead of adding to them), the file's values are typed by
//! serde (a string where a number belongs is an error naming the key), and an unknown key is
//! an error naming the key. A required option given neither way is an error as without a file.

use std::{ffi::OsString, path::PathBuf};

use anyhow::{Context as _, bail};
use clap::{Arg, ArgMatches, Command, CommandFactory, FromArgMatches, parser::ValueSource};
use serde::{Serialize, de::DeserializeOwned};

/// The flag that names the file.
const FLAG: &str = "config";

/// Subcommands that accept `--config`.
const SUBCOMMANDS: &[&str] = &["balance", "switch"];

/// Adds `--config FILE` to the subcommands that read a configuration file.
#[must_use]
fn with_config_flag(mut command: Command) -> Command {
    for &name in SUBCOMMANDS {
        if command.find_subcommand(name).is_none() {
            continue;
        }
        command = command.mut_subcommand(name, |sub| {
            sub.arg(
                Arg::new(FLAG)
                    .long(FLAG)
                    .value_name("FILE")
                    .value_parser(clap::value_parser!(PathBuf))
                    .help("Read options from a TOML file: keys are the long option names (`vip = \"10.0.0.1\"`, `backend = [\"10.0.0.2:7000\"]`, `dead-after-ms = 100`); options given on the command line win"),
            )
        });
    }
    command
}

/// The command line `args` (program name first) as `C`, with the options of the file named by
/// `--config` where the command line does not give them. Clap's errors (and `--help`) come back
/// as a [`clap::Error`] inside the `anyhow::Error`, to be printed by `clap::Error::exit`.
///
/// `C` serializes as a table of its global options with one key per subcommand, the table of
/// that subcommand's options (serde's `flatten` of an externally tagged subcommand enum).
pub fn parse<C>(args: Vec<OsString>) -> anyhow::Result<C>
where
    C: CommandFactory + FromArgMatches + Serialize + DeserializeOwned,
{
    let mut strict = with_config_flag(C::command());
    // Without a file: clap alone, with its own checks and messages (also for a command line the
    // lenient parse below rejects: the strict one rejects it too).
    let clap_alone = |mut strict: Command, args: Vec<OsString>| -> anyhow::Result<C> {
        let matches = strict.try_get_matches_from_mut(args)?;
        Ok(C::from_arg_matches(&matches).map_err(|error| error.format(&mut strict))?)
    };
    let Ok(matches) = relax_required(strict.clone()).try_get_matches_from(&args) else {
        return clap_alone(strict, args);
    };
    let Some((name, sub_matches)) = matches.subcommand().filter(|(name, _)| SUBCOMMANDS.contains(name)) else {
        return clap_alone(strict, args);
    };
    let Some(path) = sub_matches.get_one::<PathBuf>(FLAG) else {
        return clap_alone(strict, args);
    };
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read the configuration file {}", path.display()))?;
    let from_command_line = C::from_arg_matches(&matches).map_err(|error| error.format(&mut strict))?;
    let subcommand = strict.find_subcommand(name).context("the subcommand parsed is one of the command's")?;
    merge(&text, &from_command_line, &strict, subcommand, [&matches, sub_matches])
        .with_context(|| format!("in the configuration file {}", path.display()))
}

/// The subcommands that take `--config` without `required`: the file may give those options.
fn relax_required(mut command: Command) -> Command {
    for &name in SUBCOMMANDS {
        if command.find_subcommand(name).is_some() {
            command = command.mut_subcommand(name, |sub| sub.mut_args(|arg| arg.required(false)));
        }
    }
    command
}

/// `from_command_line` with the file's values for the options the command line did not give.
fn merge<C: Serialize + DeserializeOwned>(
    text: &str,
    from_command_line: &C,
    root: &Command,
    subcommand: &Command,
    matches: [&ArgMatches; 2],
) -> anyhow::Result<C> {
    let file: toml::Table = text.parse().context("not valid TOML")?;
    let given = |arg: &Arg| matches.iter().any(|m| m.value_source(arg.get_id().as_str()) == Some(ValueSource::CommandLine));
    let mut tree = toml::Table::try_from(from_command_line).context("the options as a table")?;
    for (key, value) in file.clone() {
        let (arg, global) = find_arg(root, subcommand, &key)?;
        if given(arg) {
            continue;
        }
        let table = if global {
            &mut tree
        } else {
            tree.entry(subcommand.get_name())
                .or_insert_with(|| toml::Table::new().into())
                .as_table_mut()
                .context("the subcommand's options are a table")?
        };
        table.insert(key.clone(), value);
        // One key at a time, so that a value of the wrong type is reported with its key.
        tree.clone().try_into::<C>().map_err(|error| anyhow::anyhow!("`{key}`: {}", error.message()))?;
    }
    if let Some(missing) = subcommand
        .get_arguments()
        .filter(|arg| arg.is_required_set() && !given(arg))
        .find_map(|arg| arg.get_long().filter(|long| !file.contains_key(*long)))
    {
        bail!("the required option --{missing} was given neither on the command line nor as `{missing}` in the file");
    }
    Ok(tree.try_into()?)
}

/// The argument a key names (and whether it is a global one of the root): a long option of the
/// subcommand or a global one of the root.
fn find_arg<'a>(root: &'a Command, subcommand: &'a Command, key: &str) -> anyhow::Result<(&'a Arg, bool)> {
    let long = |arg: &&Arg| arg.get_long() == Some(key) && key != FLAG;
    let globals = || root.get_arguments().filter(|a| a.is_global_set());
    subcommand
        .get_arguments()
        .find(long)
        .map(|arg| (arg, false))
        .or_else(|| globals().find(long).map(|arg| (arg, true)))
        .with_context(|| {
            let mut known: Vec<&str> =
                subcommand.get_arguments().chain(globals()).filter_map(Arg::get_long).filter(|l| *l != FLAG && *l != "help").collect();
            known.sort_unstable();
            format!("unknown key `{key}` (keys are the long options of `{}`: {})", subcommand.get_name(), known.join(", "))
        })
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use clap::Parser;
    use serde::Deserialize;

    use super::*;

    /// A stand-in for the real CLI, same shape: a global option and a subcommand with scalars,
    /// lists, a switch and a short flag.
    #[derive(Parser, Debug, Serialize, Deserialize)]
    #[command(args_override_self = true)]
    #[serde(rename_all = "kebab-case")]
    struct Cli {
        #[arg(long, global = true, default_value = "/sys/fs/bpf/xdp-lb")]
        pin_root: String,
        #[command(subcommand)]
        #[serde(flatten)]
        command: Sub,
    }

    #[derive(clap::Subcommand, Debug, Serialize, Deserialize)]
    #[serde(rename_all = "kebab-case")]
    enum Sub {
        Balance(Balance),
        #[serde(skip)]
        Status,
    }

    #[derive(clap::Args, Debug, Serialize, Deserialize)]
    #[serde(rename_all = "kebab-case")]
    struct Balance {
        #[arg(long = "iface", required = true)]
        #[serde(rename = "iface")]
        interfaces: Vec<String>,
        #[arg(long, required = true, default_value_t = std::net::Ipv4Addr::UNSPECIFIED, hide_default_value = true)]
        vip: std::net::Ipv4Addr,
        #[arg(long = "backend", required = true)]
        #[serde(rename = "backend")]
        backends: Vec<std::net::SocketAddrV4>,
        #[arg(short = 'd', long, default_value_t = 100)]
        dead_after_ms: u64,
        #[arg(long)]
        verbose: bool,
        #[arg(long)]
        address: Option<std::net::Ipv4Addr>,
    }

    #[derive(Debug)]
    struct Parsed {
        interfaces: Vec<String>,
        vip: String,
        backends: Vec<String>,
        dead_after_ms: u64,
        verbose: bool,
        address: Option<std::net::Ipv4Addr>,
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

    fn command_line(file: &ConfigFile, args: &[&str]) -> Vec<OsString> {
        let mut full: Vec<OsString> = vec!["xdp-lb".into()];
        full.extend(args.iter().map(|a| OsString::from(a.replace("FILE", &file.path().display().to_string()))));
        full
    }

    fn parse_as<C: CommandFactory + FromArgMatches + Serialize + DeserializeOwned>(file: &ConfigFile, args: &[&str]) -> anyhow::Result<C> {
        parse(command_line(file, args))
    }

    fn parse_balance(file: &ConfigFile, args: &[&str]) -> anyhow::Result<Parsed> {
        let cli: Cli = parse_as(file, args)?;
        let Sub::Balance(b) = cli.command else { panic!("not balance") };
        Ok(Parsed {
            interfaces: b.interfaces,
            vip: b.vip.to_string(),
            backends: b.backends.iter().map(ToString::to_string).collect(),
            dead_after_ms: b.dead_after_ms,
            verbose: b.verbose,
            address: b.address,
            pin_root: cli.pin_root,
        })
    }

    /// The error's whole chain, as the agent prints it.
    fn error_of<T: std::fmt::Debug>(result: anyhow::Result<T>) -> String {
        format!("{:#}", result.unwrap_err())
    }

    const FULL: &str = r#"
        vip = "10.0.0.1"
        backend = ["10.0.0.2:7000", "10.0.0.3:7000"]
        iface = ["eth0", "eth1"]
        dead-after-ms = 250
        verbose = true
        address = "10.0.0.9"
        pin-root = "/sys/fs/bpf/other"
    "#;

    #[test]
    fn file_values_reach_the_options() {
        let file = config_file(FULL);
        let p = parse_balance(&file, &["balance", "--config", "FILE"]).unwrap();
        assert_eq!(p.vip, "10.0.0.1");
        assert_eq!(p.backends, ["10.0.0.2:7000", "10.0.0.3:7000"]);
        assert_eq!(p.interfaces, ["eth0", "eth1"]);
        assert_eq!(p.dead_after_ms, 250);
        assert!(p.verbose);
        assert_eq!(p.address, Some(std::net::Ipv4Addr::new(10, 0, 0, 9)));
        assert_eq!(p.pin_root, "/sys/fs/bpf/other");
    }

    #[test]
    fn file_and_command_line_options_combine_with_globals_before_the_subcommand() {
        let file = config_file("vip = \"10.0.0.1\"\nbackend = [\"10.0.0.2:7000\", \"10.0.0.3:7000\"]\n");
        let p = parse_balance(&file, &["--pin-root", "/x", "balance", "--iface", "eth0", "--config=FILE"]).unwrap();
        assert_eq!(p.pin_root, "/x");
        assert_eq!(p.backends, ["10.0.0.2:7000", "10.0.0.3:7000"]);
        assert_eq!(p.vip, "10.0.0.1");
        assert_eq!(p.interfaces, ["eth0"]);
        assert_eq!(p.dead_after_ms, 100, "neither gives it: clap's default");
        assert!(!p.verbose);
        assert_eq!(p.address, None);
    }

    #[test]
    fn the_command_line_overrides_the_file() {
        let file = config_file(FULL);
        let p = parse_balance(
            &file,
            &["balance", "--dead-after-ms", "40", "--config", "FILE", "--backend", "10.9.9.9:69", "--vip=10.0.0.7", "--pin-root", "/y"],
        )
        .unwrap();
        assert_eq!(p.dead_after_ms, 40, "scalar from the command line");
        assert_eq!(p.vip, "10.0.0.7", "--key=value form counts too");
        assert_eq!(p.backends, ["10.9.9.9:69"], "a list on the command line replaces the file's");
        assert_eq!(p.interfaces, ["eth0", "eth1"], "keys the command line does not give come from the file");
        assert_eq!(p.pin_root, "/y", "a global option after the subcommand counts too");
        assert!(p.verbose);
    }

    #[test]
    fn a_short_flag_on_the_command_line_wins_over_the_file() {
        let file = config_file(FULL);
        let p = parse_balance(&file, &["balance", "-d", "7", "--config", "FILE"]).unwrap();
        assert_eq!(p.dead_after_ms, 7);
        let p = parse_balance(&file, &["balance", "--config", "FILE", "-d7"]).unwrap();
        assert_eq!(p.dead_after_ms, 7, "attached value");
    }

    #[test]
    fn lists_come_whole_from_one_side() {
        let file = config_file("vip = \"10.0.0.1\"\nbackend = [\"10.0.0.2:7000\"]\niface = [\"eth0\", \"eth1\", \"eth2\"]\n");
        let p = parse_balance(&file, &["balance", "--config", "FILE"]).unwrap();
        assert_eq!(p.interfaces, ["eth0", "eth1", "eth2"]);
        assert_eq!(p.backends, ["10.0.0.2:7000"]);
        let p = parse_balance(&file, &["balance", "--config", "FILE", "--iface", "a", "--iface", "b"]).unwrap();
        assert_eq!(p.interfaces, ["a", "b"], "not added to the file's");
        let single = config_file("vip = \"10.0.0.1\"\nbackend = \"10.0.0.2:7000\"\niface = [\"eth0\"]\n");
        assert!(error_of(parse_balance(&single, &["balance", "--config", "FILE"])).contains("`backend`"), "a list needs an array");
    }

    #[test]
    fn unknown_keys_are_errors_naming_the_key() {
        let file = config_file("vip = \"10.0.0.1\"\nbackends = [\"10.0.0.2:7000\"]\n");
        let error = error_of(parse_balance(&file, &["balance", "--config", "FILE"]));
        assert!(error.contains("unknown key `backends`"), "{error}");
        assert!(error.contains("backend, "), "lists the known keys: {error}");
        assert!(error.contains(&file.path().display().to_string()), "names the file: {error}");
        // `config` itself is not a key.
        let file = config_file("config = \"other.toml\"\n");
        assert!(parse_balance(&file, &["balance", "--config", "FILE", "--iface", "e", "--vip", "10.0.0.1", "--backend", "10.0.0.2:7"]).is_err());
    }

    #[test]
    fn bad_values_and_files_are_errors() {
        let nested = config_file("backend = [[\"10.0.0.2:7000\"]]\nvip = \"10.0.0.1\"\niface = [\"eth0\"]\n");
        assert!(error_of(parse_balance(&nested, &["balance", "--config", "FILE"])).contains("`backend`"));
        let switch = config_file("verbose = \"yes\"\n");
        assert!(error_of(parse_balance(&switch, &["balance", "--config", "FILE"])).contains("`verbose`"));
        let number = config_file("dead-after-ms = \"soon\"\n");
        assert!(error_of(parse_balance(&number, &["balance", "--config", "FILE"])).contains("`dead-after-ms`"));
        let broken = config_file("vip = \n");
        assert!(error_of(parse_balance(&broken, &["balance", "--config", "FILE"])).contains("TOML"));
        // A value the options' type rejects is rejected as on the command line.
        let bad_ip = config_file("vip = \"not-an-ip\"\niface = [\"eth0\"]\nbackend = [\"10.0.0.2:7000\"]\n");
        assert!(error_of(parse_balance(&bad_ip, &["balance", "--config", "FILE"])).contains("`vip`"));
        let missing: anyhow::Result<Cli> = parse(["xdp-lb", "balance", "--config", "/nonexistent/xdp-lb.toml"].map(OsString::from).to_vec());
        assert!(error_of(missing).contains("cannot read the configuration file"));
    }

    #[test]
    fn required_options_come_from_either_side() {
        let no_vip = config_file("iface = [\"eth0\"]\nbackend = [\"10.0.0.2:7000\"]\n");
        let error = error_of(parse_balance(&no_vip, &["balance", "--config", "FILE"]));
        assert!(error.contains("--vip"), "{error}");
        assert_eq!(parse_balance(&no_vip, &["balance", "--config", "FILE", "--vip", "10.0.0.5"]).unwrap().vip, "10.0.0.5");
        let no_list = config_file("vip = \"10.0.0.1\"\n");
        assert!(error_of(parse_balance(&no_list, &["balance", "--config", "FILE", "--iface", "eth0"])).contains("--backend"));
    }

    #[test]
    fn without_config_clap_alone_parses() {
        let cli: Cli = parse(["xdp-lb", "status"].map(OsString::from).to_vec()).unwrap();
        assert!(matches!(cli.command, Sub::Status));
        let no_vip: anyhow::Result<Cli> = parse(["xdp-lb", "balance", "--iface", "e", "--backend", "10.0.0.2:7"].map(OsString::from).to_vec());
        let error = no_vip.unwrap_err().downcast::<clap::Error>().expect("clap's own error");
        assert_eq!(error.kind(), clap::error::ErrorKind::MissingRequiredArgument, "required without a file, the placeholder default notwithstanding");
        let before: anyhow::Result<Cli> = parse(["xdp-lb", "--config", "x", "balance"].map(OsString::from).to_vec());
        assert!(before.unwrap_err().downcast::<clap::Error>().is_ok(), "--config before the subcommand");
    }

    /// The real CLI's options as the table `merge` works on.
    fn real_tree(args: &[&str], file: &ConfigFile) -> toml::Table {
        toml::Table::try_from(parse_as::<crate::Cli>(file, args).unwrap()).unwrap()
    }

    #[test]
    fn every_long_option_of_the_agents_is_a_key_of_their_options() {
        // serde's names are the long option names: what the command line can give, the file
        // can too. (Options without a value, here given by the file, serialize to nothing.)
        let root = crate::Cli::command();
        for (args, text) in [
            (
                &["balance", "--iface", "eth0", "--vip", "10.0.0.1", "--backend", "10.0.0.2:7000", "--config", "FILE"][..],
                "control-key-file = \"/k\"\naddress = \"10.0.0.9\"\npeer = \"10.0.0.3:6970\"\n",
            ),
            (
                &["switch", "--iface", "eth0", "--lb-iface", "eth0", "--vip", "10.0.0.1", "--lb", "10.0.0.2:6970", "--lb", "10.0.0.3:6970", "--config", "FILE"],
                "control-key-file = \"/k\"\naddress = \"10.0.0.9\"\n",
            ),
        ] {
            let tree = real_tree(args, &config_file(text));
            let mut keys: Vec<&str> = tree[args[0]].as_table().unwrap().keys().map(String::as_str).collect();
            let mut longs: Vec<&str> = root.find_subcommand(args[0]).unwrap().get_arguments().filter_map(Arg::get_long).filter(|l| *l != "help").collect();
            keys.sort_unstable();
            longs.sort_unstable();
            assert_eq!(keys, longs, "{}", args[0]);
            assert!(tree.contains_key("pin-root"));
        }
    }

    #[test]
    fn the_control_key_options_come_from_the_file_for_both_agents() {
        let file = config_file("control-key-file = \"/etc/xdp-lb/control.key\"\ncontrol-max-skew-ms = 5000\n");
        for args in [
            &["balance", "--iface", "eth0", "--vip", "10.0.0.1", "--backend", "10.0.0.2:7000", "--config", "FILE"][..],
            &["switch", "--iface", "eth0", "--lb-iface", "eth0", "--vip", "10.0.0.1", "--lb", "10.0.0.2:6970", "--lb", "10.0.0.3:6970", "--config", "FILE"],
        ] {
            let tree = real_tree(args, &file);
            let options = tree[args[0]].as_table().unwrap();
            assert_eq!(options["control-key-file"].as_str(), Some("/etc/xdp-lb/control.key"), "{}", args[0]);
            assert_eq!(options["control-max-skew-ms"].as_integer(), Some(5000));
            assert_eq!(options["insecure-control"].as_bool(), Some(false));
        }
        let insecure = config_file("insecure-control = true\n");
        let args = ["balance", "--iface", "eth0", "--vip", "10.0.0.1", "--backend", "10.0.0.2:7000", "--config", "FILE"];
        assert_eq!(real_tree(&args, &insecure)["balance"]["insecure-control"].as_bool(), Some(true));
    }

    #[test]
    fn the_example_file_is_valid_for_the_real_cli() {
        let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/xdp-lb.example.toml");
        let cli: crate::Cli = parse(["xdp-lb", "balance", "--config", example].map(OsString::from).to_vec()).unwrap();
        let tree = toml::Table::try_from(cli).unwrap();
        let example: toml::Table = std::fs::read_to_string(example).unwrap().parse().unwrap();
        // Every key of the example arrives with its value.
        for (key, value) in &example {
            let got = if key == "pin-root" { &tree[key] } else { &tree["balance"][key] };
            assert_eq!(got, value, "{key}");
        }
        assert_eq!(tree["balance"]["backend"].as_array().map(Vec::len), Some(3));
    }
}
