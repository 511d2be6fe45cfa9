//! Reports kept while the controller is unreachable (statuses, telemetry, benchmark, prestage and eval
//! reports): bounded per kind (the oldest of a kind is dropped first
//! and counted), replayed in the order they were produced right after the next session's Hello.

use std::collections::VecDeque;

use alki_shared::proto::{self, agent_message};

/// The kinds of report the agent sends up, each with its own bound.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReportKind {
    Status,
    Telemetry,
    Benchmark,
    Prestage,
    Eval,
}

impl ReportKind {
    pub const ALL: [ReportKind; 5] =
        [ReportKind::Status, ReportKind::Telemetry, ReportKind::Benchmark, ReportKind::Prestage, ReportKind::Eval];

    pub fn label(self) -> &'static str {
        match self {
            ReportKind::Status => "status",
            ReportKind::Telemetry => "telemetry",
            ReportKind::Benchmark => "benchmark",
            ReportKind::Prestage => "prestage",
            ReportKind::Eval => "eval",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// One report waiting for the controller.
#[derive(Clone, Debug, PartialEq)]
pub enum Report {
    Status(proto::Status),
    Telemetry(proto::Telemetry),
    Benchmark(proto::BenchmarkReport),
    Prestage(proto::PrestageReport),
    /// Boxed: a quality result is several times larger than the other reports.
    Eval(Box<proto::EvalReport>),
}

impl Report {
    pub fn kind(&self) -> ReportKind {
        match self {
            Report::Status(_) => ReportKind::Status,
            Report::Telemetry(_) => ReportKind::Telemetry,
            Report::Benchmark(_) => ReportKind::Benchmark,
            Report::Prestage(_) => ReportKind::Prestage,
            Report::Eval(_) => ReportKind::Eval,
        }
    }

    pub fn into_msg(self) -> agent_message::Msg {
        match self {
            Report::Status(s) => agent_message::Msg::Status(s),
            Report::Telemetry(t) => agent_message::Msg::Telemetry(t),
            Report::Benchmark(b) => agent_message::Msg::Benchmark(b),
            Report::Prestage(p) => agent_message::Msg::Prestage(p),
            Report::Eval(e) => agent_message::Msg::Eval(*e),
        }
    }
}

/// How many kinds of report there are.
pub const KINDS: usize = ReportKind::ALL.len();

/// How many reports of each kind are kept. The sum stays well under the controller's per-device message
/// burst (200), so a replay is never taken for a flood.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bounds {
    /// Phase changes: the newest say what the device serves; older ones only tell the way there.
    pub status: usize,
    /// Telemetry intervals: cumulative counters plus per-interval rates, so the newest window is meaningful
    /// on its own (40 × the controller's 10 s interval: the last ~7 minutes).
    pub telemetry: usize,
    /// Benchmark results are few and expensive to produce.
    pub benchmark: usize,
    /// Answers to Prestage commands; the rollout waits on them.
    pub prestage: usize,
    /// Quality evaluations (one per candidate variant and suite); the quality gates wait on them.
    pub eval: usize,
}

impl Default for Bounds {
    fn default() -> Self {
        Bounds { status: 16, telemetry: 40, benchmark: 8, prestage: 16, eval: 16 }
    }
}

impl Bounds {
    fn of(&self, kind: ReportKind) -> usize {
        match kind {
            ReportKind::Status => self.status,
            ReportKind::Telemetry => self.telemetry,
            ReportKind::Benchmark => self.benchmark,
            ReportKind::Prestage => self.prestage,
            ReportKind::Eval => self.eval,
        }
    }
}

/// What [`Outbox::push`] did, so the caller logs a kind's first drop once per outage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pushed {
    Kept,
    /// The oldest report of this kind was dropped to make room; the first drop of the kind since the last replay.
    FirstDrop(ReportKind),
    /// Dropped the oldest again (already logged).
    Dropped,
}

/// The reports kept while disconnected, oldest first across all kinds.
#[derive(Debug, Default)]
pub struct Outbox {
    bounds: Bounds,
    queue: VecDeque<Report>,
    held: [usize; KINDS],
    /// Drops since the last replay (for the one log line), and since the agent started (for the metric).
    dropped_now: [u64; KINDS],
    dropped_total: [u64; KINDS],
}

impl Outbox {
    pub fn new(bounds: Bounds) -> Outbox {
        Outbox { bounds, ..Default::default() }
    }

    /// Keeps `report`, dropping the oldest of its kind when the kind is at its bound (a bound of 0 keeps none).
    pub fn push(&mut self, report: Report) -> Pushed {
        let kind = report.kind();
        let i = kind.index();
        let bound = self.bounds.of(kind);
        let mut outcome = Pushed::Kept;
        if self.held[i] >= bound {
            let first = self.dropped_now[i] == 0;
            if bound == 0 {
                self.count_drop(i);
                return if first { Pushed::FirstDrop(kind) } else { Pushed::Dropped };
            }
            if let Some(oldest) = self.queue.iter().position(|r| r.kind() == kind) {
                self.queue.remove(oldest);
                self.held[i] -= 1;
            }
            self.count_drop(i);
            outcome = if first { Pushed::FirstDrop(kind) } else { Pushed::Dropped };
        }
        self.queue.push_back(report);
        self.held[i] += 1;
        outcome
    }

    fn count_drop(&mut self, i: usize) {
        self.dropped_now[i] += 1;
        self.dropped_total[i] += 1;
    }

    /// The oldest report, to send; removed with [`Outbox::sent`] only once the send succeeded.
    pub fn front(&self) -> Option<&Report> {
        self.queue.front()
    }

    /// The front report went out.
    pub fn sent(&mut self) {
        if let Some(report) = self.queue.pop_front() {
            self.held[report.kind().index()] -= 1;
        }
        if self.queue.is_empty() {
            self.dropped_now = [0; KINDS];
        }
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// Reports of `kind` kept now.
    pub fn held(&self, kind: ReportKind) -> usize {
        self.held[kind.index()]
    }

    /// Reports of `kind` dropped since the last complete replay.
    pub fn dropped_since_replay(&self, kind: ReportKind) -> u64 {
        self.dropped_now[kind.index()]
    }

    /// Reports of `kind` dropped since the agent started.
    pub fn dropped_total(&self, kind: ReportKind) -> u64 {
        self.dropped_total[kind.index()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(generation: u64) -> Report {
        Report::Status(proto::Status { generation, ..Default::default() })
    }

    fn telemetry(at: i64) -> Report {
        Report::Telemetry(proto::Telemetry { at_unix_ms: at, ..Default::default() })
    }

    fn drain(outbox: &mut Outbox) -> Vec<Report> {
        let mut out = Vec::new();
        while let Some(r) = outbox.front().cloned() {
            out.push(r);
            outbox.sent();
        }
        out
    }

    #[test]
    fn each_kind_keeps_its_newest_within_its_bound_and_counts_drops() {
        let bounds = Bounds { status: 2, telemetry: 3, benchmark: 1, prestage: 1, eval: 1 };
        let mut outbox = Outbox::new(bounds);
        let mut firsts = Vec::new();
        for i in 0..5 {
            for pushed in [outbox.push(status(i)), outbox.push(telemetry(i as i64))] {
                if let Pushed::FirstDrop(kind) = pushed {
                    firsts.push(kind);
                }
            }
        }
        assert_eq!(firsts, vec![ReportKind::Status, ReportKind::Telemetry], "each kind's first drop is reported once");
        assert_eq!((outbox.held(ReportKind::Status), outbox.held(ReportKind::Telemetry)), (2, 3));
        assert_eq!(outbox.dropped_since_replay(ReportKind::Status), 3);
        assert_eq!(outbox.dropped_since_replay(ReportKind::Telemetry), 2);
        assert_eq!(outbox.dropped_since_replay(ReportKind::Benchmark), 0);
        // Oldest first across kinds, the production order kept: s3 t2 t3 s4 t4.
        let replay = drain(&mut outbox);
        assert_eq!(replay, vec![telemetry(2), status(3), telemetry(3), status(4), telemetry(4)]);
        // A full replay starts a new outage: its drops are reported again; the totals remain.
        assert_eq!(outbox.dropped_since_replay(ReportKind::Status), 0);
        assert_eq!(outbox.dropped_total(ReportKind::Status), 3);
        for i in 0..3 {
            outbox.push(status(10 + i));
        }
        assert_eq!(outbox.dropped_total(ReportKind::Status), 4);
    }

    #[test]
    fn a_report_leaves_only_once_sent_and_kinds_do_not_crowd_each_other_out() {
        let mut outbox = Outbox::new(Bounds::default());
        for i in 0..100 {
            outbox.push(telemetry(i));
        }
        outbox.push(Report::Prestage(proto::PrestageReport { command_id: "c1".into(), ..Default::default() }));
        outbox.push(Report::Eval(Box::new(proto::EvalReport { command_id: "e1".into(), ..Default::default() })));
        outbox.push(status(7));
        assert_eq!(outbox.len(), Bounds::default().telemetry + 3, "telemetry never pushes out a status");
        // A failed send leaves the report in front, for the next session.
        assert_eq!(outbox.front(), Some(&telemetry(60)));
        assert_eq!(outbox.front(), Some(&telemetry(60)));
        let replay = drain(&mut outbox);
        assert_eq!(replay.len(), Bounds::default().telemetry + 3);
        assert!(matches!(&replay[replay.len() - 2], Report::Eval(e) if e.command_id == "e1"));
        assert_eq!(replay.last(), Some(&status(7)));
        assert!(outbox.is_empty());
    }

    #[test]
    fn a_bound_of_zero_keeps_nothing_of_that_kind() {
        let mut outbox = Outbox::new(Bounds { benchmark: 0, ..Bounds::default() });
        let report = Report::Benchmark(proto::BenchmarkReport::default());
        assert_eq!(outbox.push(report.clone()), Pushed::FirstDrop(ReportKind::Benchmark));
        assert_eq!(outbox.push(report), Pushed::Dropped);
        assert!(outbox.is_empty());
    }
}
