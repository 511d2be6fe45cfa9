//! CPU priority of processes that must yield to what is served: an evaluation's llama-perplexity runs and its
//! loopback llama-server. Set in the child between fork and exec, so every thread it starts inherits it.

use serde::Deserialize;

/// The nice value of background work: the lowest CPU share the scheduler gives.
pub const BACKGROUND_NICE: libc::c_int = 19;

/// How much CPU a background process may take from the serving model.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    /// `SCHED_IDLE` and nice 19: runs only on CPU time nothing else wants (the default).
    #[default]
    Idle,
    /// Nice 19 only: a small share of the CPU even while the serving model is busy.
    Nice,
    /// The agent's own priority (for benchmarking the evaluation itself, or a dedicated test device).
    Normal,
}

impl Priority {
    pub fn label(self) -> &'static str {
        match self {
            Priority::Idle => "idle",
            Priority::Nice => "nice",
            Priority::Normal => "normal",
        }
    }
}

/// Makes `command`'s process run at `priority`. Best effort: lowering one's own priority needs no privilege,
/// but a sandbox may forbid the call; the process then runs at the agent's priority rather than not at all.
pub fn lower(command: &mut tokio::process::Command, priority: Priority) {
    if priority == Priority::Normal {
        return;
    }
    let idle = priority == Priority::Idle;
    // SAFETY: between fork and exec the closure only calls the async-signal-safe setpriority and
    // sched_setscheduler on the calling process, allocates nothing and ignores their errors.
    unsafe {
        command.pre_exec(move || {
            let _ = libc::setpriority(libc::PRIO_PROCESS, 0, BACKGROUND_NICE);
            if idle {
                let param = libc::sched_param { sched_priority: 0 };
                let _ = libc::sched_setscheduler(0, libc::SCHED_IDLE, &param);
            }
            Ok(())
        });
    }
}

/// The nice value and scheduling policy of process `pid` now, from `/proc/<pid>/stat` (fields 19 and 41).
pub fn of_process(pid: u32) -> Option<(i64, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: fields are counted after its last ')'.
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state): field n is at index n - 3.
    let nice = fields.get(19 - 3)?.parse().ok()?;
    let policy = fields.get(41 - 3)?.parse().ok()?;
    Some((nice, policy))
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn spawned(priority: Priority) -> (i64, u32) {
        let mut command = tokio::process::Command::new("sleep");
        command.arg("5").kill_on_drop(true);
        lower(&mut command, priority);
        let child = command.spawn().expect("sleep starts");
        let pid = child.id().expect("pid");
        of_process(pid).expect("stat readable")
    }

    #[tokio::test]
    async fn background_processes_run_niced_and_idle_from_their_first_instruction() {
        let (nice, policy) = spawned(Priority::Idle).await;
        assert_eq!((nice, policy), (19, libc::SCHED_IDLE as u32));
        let (nice, policy) = spawned(Priority::Nice).await;
        assert_eq!((nice, policy), (19, libc::SCHED_OTHER as u32));
        let own = of_process(std::process::id()).expect("own stat");
        assert_eq!(spawned(Priority::Normal).await, own, "normal: the agent's own priority");
    }
}
