//! Agent configuration: flags mirrored by `DROVER_*` environment variables (flags win).

use std::collections::BTreeMap;
use std::path::PathBuf;

use clap::Parser;
use drover_proto::identity::{PeerIdentity, Role};
use drover_proto::pb;
use drover_proto::quantity::{parse_bytes, parse_cpu_millis};

#[derive(Debug, Clone, Parser)]
#[command(
    name = "drover-agent",
    version,
    about = "Drover's worker agent: registers with the coordinators and runs tasks"
)]
pub struct Config {
    /// YAML file of settings (keys are flag names); flags and DROVER_* variables win over it.
    #[arg(long, env = "DROVER_CONFIG")]
    pub config: Option<PathBuf>,

    /// Coordinator addresses (any members; the agent finds the leader), comma-separated.
    #[arg(
        long,
        env = "DROVER_COORDINATOR",
        value_delimiter = ',',
        required = true
    )]
    pub coordinator: Vec<String>,

    /// Directory holding ca.pem, NAME.pem and NAME-key.pem.
    #[arg(long, env = "DROVER_TLS_DIR")]
    pub tls_dir: PathBuf,

    /// Certificate name inside --tls-dir (NAME.pem, NAME-key.pem) [default: the agent's name].
    /// The certificate's common name is the agent's name: `droverctl certs issue --role agent
    /// --name NAME`.
    #[arg(long, env = "DROVER_TLS_NAME")]
    pub tls_name: Option<String>,

    /// This agent's name, unique in the cluster; it must be its certificate's name [default: the
    /// certificate's name, and the certificate's file name defaults to the host name].
    #[arg(long, env = "DROVER_AGENT_NAME")]
    pub name: Option<String>,

    /// Labels as k=v, comma-separated.
    #[arg(long, env = "DROVER_LABELS", value_delimiter = ',')]
    pub labels: Vec<String>,

    /// Resources offered as k=v, comma-separated: cpu (cores or millicores, e.g. 2 or 500m),
    /// memory (e.g. 4Gi), gpus, and any named extended resource (e.g. ssd=1).
    /// cpu and memory default to the host's.
    #[arg(long, env = "DROVER_RESOURCES", value_delimiter = ',')]
    pub resources: Vec<String>,

    /// Pool (instance group) this agent belongs to; autoscaling acts per pool.
    #[arg(long, env = "DROVER_POOL", default_value = "default")]
    pub pool: String,

    /// The machine behind this agent, for autoscaler hooks to remove the right one. Default:
    /// read from the cloud's metadata where present (cloud-init's instance-id file), else the
    /// host name (a pod's name under Kubernetes).
    #[arg(long, env = "DROVER_INSTANCE_ID")]
    pub instance_id: Option<String>,

    /// Resource class this agent serves.
    #[arg(long, env = "DROVER_CLASS", default_value = "default")]
    pub class: String,

    /// Where task working directories and logs live.
    #[arg(long, env = "DROVER_WORK_DIR", default_value = "drover-agent-work")]
    pub work_dir: PathBuf,

    /// cgroup v2 directory to run tasks under (delegated to the agent) [default: the agent's own cgroup].
    #[arg(long, env = "DROVER_CGROUP_ROOT")]
    pub cgroup_root: Option<PathBuf>,

    /// Task logs older than this many hours are deleted.
    #[arg(long, env = "DROVER_LOG_RETENTION_HOURS", default_value_t = 72)]
    pub log_retention_hours: u64,

    /// Run tasks as this user (name or uid) instead of the agent's, so they cannot read the
    /// agent's key; the agent must run as root and its key must be unreadable to that user.
    #[arg(long, env = "DROVER_TASK_USER")]
    pub task_user: Option<String>,
}

/// Environment variables a config file may set.
pub const ENV_VARS: &[&str] = &[
    "DROVER_COORDINATOR",
    "DROVER_TLS_DIR",
    "DROVER_TLS_NAME",
    "DROVER_AGENT_NAME",
    "DROVER_LABELS",
    "DROVER_RESOURCES",
    "DROVER_POOL",
    "DROVER_CLASS",
    "DROVER_WORK_DIR",
    "DROVER_CGROUP_ROOT",
    "DROVER_LOG_RETENTION_HOURS",
    "DROVER_TASK_USER",
];

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "--name {name}: certificate {file}.pem is issued to agent '{cert}', and the coordinator \
         accepts an agent only under its certificate's name; pass --name {cert}, or issue one for \
         this name: droverctl certs issue --role agent --name {name}"
    )]
    CertName {
        name: String,
        file: String,
        cert: String,
    },
    #[error(
        "certificate {file}.pem has role '{role}', not agent: issue one with droverctl certs issue \
         --role agent --name NAME"
    )]
    CertRole { file: String, role: String },
    #[error("--labels '{0}': expected k=v")]
    BadLabel(String),
    #[error("--resources '{entry}': {message}")]
    BadResource { entry: String, message: String },
}

impl Config {
    pub fn agent_name(&self) -> String {
        self.name.clone().unwrap_or_else(host_name)
    }

    /// The file name of the agent's certificate inside --tls-dir.
    pub fn cert_name(&self) -> String {
        self.tls_name.clone().unwrap_or_else(|| self.agent_name())
    }

    /// The agent's name given its certificate's: they must agree, because the coordinator
    /// accepts an agent only under the name its certificate carries.
    pub fn name_from_certificate(&self, cert: &PeerIdentity) -> Result<String, ConfigError> {
        if cert.role != Role::Agent {
            return Err(ConfigError::CertRole {
                file: self.cert_name(),
                role: cert.role.to_string(),
            });
        }
        match &self.name {
            Some(n) if *n != cert.name => Err(ConfigError::CertName {
                name: n.clone(),
                file: self.cert_name(),
                cert: cert.name.clone(),
            }),
            _ => Ok(cert.name.clone()),
        }
    }

    pub fn parsed_labels(&self) -> Result<BTreeMap<String, String>, ConfigError> {
        self.labels
            .iter()
            .filter(|l| !l.is_empty())
            .map(|l| match l.split_once('=') {
                Some((k, v)) if !k.trim().is_empty() => {
                    Ok((k.trim().to_owned(), v.trim().to_owned()))
                }
                _ => Err(ConfigError::BadLabel(l.clone())),
            })
            .collect()
    }

    pub fn parsed_resources(&self) -> Result<pb::Resources, ConfigError> {
        let mut r = pb::Resources {
            cpu_millis: host_cpu_millis(),
            memory_bytes: host_memory_bytes(),
            gpus: 0,
            extended: Default::default(),
        };
        for entry in self.resources.iter().filter(|e| !e.is_empty()) {
            let bad = |message: String| ConfigError::BadResource {
                entry: entry.clone(),
                message,
            };
            let (k, v) = entry
                .split_once('=')
                .ok_or_else(|| bad("expected k=v".into()))?;
            match k.trim() {
                "cpu" => r.cpu_millis = parse_cpu_millis(v).map_err(bad)?,
                "memory" | "mem" => r.memory_bytes = parse_bytes(v).map_err(bad)?,
                "gpus" | "gpu" => {
                    r.gpus = v
                        .trim()
                        .parse()
                        .map_err(|_| bad(format!("'{v}' is not a count")))?
                }
                other => {
                    let n = v
                        .trim()
                        .parse()
                        .map_err(|_| bad(format!("'{v}' is not a count")))?;
                    r.extended.insert(other.to_owned(), n);
                }
            }
        }
        Ok(r)
    }
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "agent".into())
}

fn host_cpu_millis() -> u64 {
    std::thread::available_parallelism()
        .map(|n| n.get() as u64 * 1000)
        .unwrap_or(1000)
}

fn host_memory_bytes() -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap_or(1 << 30)
}

/// The instance id: the flag, else cloud-init's record of it, else the host name.
pub fn instance_id(flag: Option<&str>) -> String {
    if let Some(id) = flag.filter(|s| !s.is_empty()) {
        return id.to_owned();
    }
    for path in ["/var/lib/cloud/data/instance-id", "/etc/hostname"] {
        if let Ok(text) = std::fs::read_to_string(path) {
            let id = text.trim();
            if !id.is_empty() && id != "iid-datasource-none" {
                return id.to_owned();
            }
        }
    }
    std::env::var("HOSTNAME").unwrap_or_default()
}

#[cfg(test)]
mod cert_name_tests {
    use clap::Parser;
    use drover_proto::identity::{PeerIdentity, Role};

    use super::Config;

    fn config(args: &[&str]) -> Config {
        let mut argv = vec!["drover-agent", "--coordinator", "x:1", "--tls-dir", "/t"];
        argv.extend_from_slice(args);
        Config::try_parse_from(argv).unwrap()
    }

    fn cert(name: &str, role: Role) -> PeerIdentity {
        PeerIdentity {
            name: name.into(),
            role,
        }
    }

    #[test]
    fn the_agent_takes_its_certificates_name_and_refuses_another() {
        // The file follows the name, and a certificate file named otherwise gives its name.
        let c = config(&["--name", "worker-1"]);
        assert_eq!(c.cert_name(), "worker-1");
        assert_eq!(
            c.name_from_certificate(&cert("worker-1", Role::Agent))
                .unwrap(),
            "worker-1"
        );
        let c = config(&["--tls-name", "w1-cert"]);
        assert_eq!(c.cert_name(), "w1-cert");
        assert_eq!(
            c.name_from_certificate(&cert("worker-1", Role::Agent))
                .unwrap(),
            "worker-1"
        );
        // A name the certificate does not carry, or a certificate of another role: refused.
        let c = config(&["--name", "worker-2", "--tls-name", "w1-cert"]);
        let e = c
            .name_from_certificate(&cert("worker-1", Role::Agent))
            .unwrap_err()
            .to_string();
        assert!(e.contains("issued to agent 'worker-1'"), "{e}");
        assert!(e.contains("--name worker-1"), "{e}");
        let e = config(&["--name", "admin"])
            .name_from_certificate(&cert("admin", Role::Admin))
            .unwrap_err()
            .to_string();
        assert!(e.contains("role 'admin', not agent"), "{e}");
    }
}
