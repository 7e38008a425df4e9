//! `droverctl pool apply -f pools.yaml`: the pools file (YAML, durations such as 30s or 5m) to
//! the coordinator's pool specs, checked with the coordinator's own checks first.

use std::collections::BTreeMap;

use drover_coordinator::model::{Hook, PoolSpec, ScaleDown, ScaleUp};
use serde::Deserialize;

use crate::spec::{DurationMs, SpecError};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PoolsFile {
    pools: Vec<PoolFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PoolFile {
    name: String,
    #[serde(default)]
    min: u32,
    max: u32,
    /// The agents' class (default: the pool's name) and labels: what tasks they can take.
    class: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    scale_up: UpFile,
    scale_down: DownFile,
    boot_timeout: Option<DurationMs>,
    hook: HookFile,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UpFile {
    #[serde(default)]
    pending_per_agent: u32,
    wait_p90_over: Option<DurationMs>,
    step: Option<u32>,
    cooldown: Option<DurationMs>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DownFile {
    idle_for: DurationMs,
    step: Option<u32>,
    cooldown: Option<DurationMs>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HookFile {
    exec: Option<ExecFile>,
    webhook: Option<WebhookFile>,
    local: Option<LocalFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExecFile {
    command: Vec<String>,
    timeout: Option<DurationMs>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WebhookFile {
    url: String,
    secret_env: String,
    timeout: Option<DurationMs>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LocalFile {
    #[serde(default)]
    agent_args: Vec<String>,
}

/// Parses and checks a pools file.
pub fn parse(file: &str, text: &str) -> Result<Vec<PoolSpec>, SpecError> {
    let parsed: PoolsFile = serde_norway::from_str(text).map_err(|e| SpecError::Yaml {
        file: file.to_owned(),
        message: e.to_string(),
    })?;
    let invalid = |message: String| SpecError::Invalid {
        file: file.to_owned(),
        message,
    };
    let mut out = Vec::new();
    for p in parsed.pools {
        let ms = |d: Option<DurationMs>, default: u64| d.map_or(default, |d| d.0);
        let hook = match (p.hook.exec, p.hook.webhook, p.hook.local) {
            (Some(e), None, None) => Hook::Exec {
                command: e.command,
                timeout_ms: ms(e.timeout, 30_000),
            },
            (None, Some(w), None) => Hook::Webhook {
                url: w.url,
                secret_env: w.secret_env,
                timeout_ms: ms(w.timeout, 10_000),
            },
            (None, None, Some(l)) => Hook::Local {
                agent_args: l.agent_args,
            },
            _ => {
                return Err(invalid(format!(
                    "pools.{}.hook: give exactly one of exec, webhook, local",
                    p.name
                )));
            }
        };
        let spec = PoolSpec {
            class: p.class.unwrap_or_else(|| p.name.clone()),
            name: p.name,
            min: p.min,
            max: p.max,
            labels: p.labels,
            scale_up: ScaleUp {
                pending_per_agent: p.scale_up.pending_per_agent,
                wait_p90_over_ms: ms(p.scale_up.wait_p90_over, 0),
                step: p.scale_up.step.unwrap_or(1),
                cooldown_ms: ms(p.scale_up.cooldown, 60_000),
            },
            scale_down: ScaleDown {
                idle_for_ms: p.scale_down.idle_for.0,
                step: p.scale_down.step.unwrap_or(1),
                cooldown_ms: ms(p.scale_down.cooldown, 120_000),
            },
            boot_timeout_ms: ms(p.boot_timeout, 300_000),
            hook,
        };
        drover_coordinator::pools::check(&spec).map_err(|e| invalid(e.to_string()))?;
        out.push(spec);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const POOLS: &str = r#"pools:
  - name: cpu-large
    min: 1
    max: 20
    scale_up:   {pending_per_agent: 5, wait_p90_over: 30s, step: 4, cooldown: 60s}
    scale_down: {idle_for: 5m, step: 2, cooldown: 120s}
    boot_timeout: 5m
    hook:
      exec: {command: ["deploy/hooks/aws-asg.sh"], timeout: 30s}
  - name: gpu
    max: 4
    scale_up: {pending_per_agent: 1}
    scale_down: {idle_for: 10m}
    hook:
      webhook: {url: "https://scaler.example/hook", secret_env: HOOK_SECRET, timeout: 10s}
"#;

    #[test]
    fn the_documented_pools_file_parses_with_its_defaults() {
        let pools = parse("pools.yaml", POOLS).unwrap();
        let cpu = &pools[0];
        assert_eq!((cpu.min, cpu.max, cpu.class.as_str()), (1, 20, "cpu-large"));
        assert_eq!(cpu.scale_up.wait_p90_over_ms, 30_000);
        assert_eq!(
            (cpu.scale_down.idle_for_ms, cpu.boot_timeout_ms),
            (300_000, 300_000)
        );
        assert!(matches!(
            &cpu.hook,
            Hook::Exec {
                timeout_ms: 30_000,
                ..
            }
        ));
        assert_eq!(pools[1].scale_up.step, 1);
        assert!(matches!(&pools[1].hook, Hook::Webhook { .. }));
    }

    #[test]
    fn bad_pools_are_refused_naming_the_field() {
        let e = parse("p.yaml", &POOLS.replace("max: 20", "max: 0"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("pools.cpu-large.max"), "{e}");
        let e = parse("p.yaml", &POOLS.replace("idle_for: 5m", "idle_for: soon"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a duration") && e.contains("line 6"), "{e}");
        let e = parse("p.yaml", &POOLS.replace("exec:", "exek:"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("exek"), "{e}");
        let e = parse("p.yaml", &POOLS.replace("https://scaler", "ftp://scaler"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("not an http"), "{e}");
    }
}
