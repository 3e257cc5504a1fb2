//! Bank transfers ordered on both of their accounts at once, with `Mode::sync_all`.
//!
//! A bank keeps the balances of a few dozen accounts. A deposit is keyed by its account
//! (`Mode::Sync(account)`), a transfer by both of its accounts
//! (`Mode::sync_all([from, to])`), and a balance read is `Mode::Concurrent`. The bank
//! service reads the balances a request touches, awaits a millisecond (the round trip to
//! a database), then writes them back: two requests on one account that overlap would
//! lose one of the updates. The bank's own lock is held only while it reads or writes,
//! so the only thing that keeps the books right is the order the layer imposes.
//!
//! Many tasks on a multi-thread runtime send thousands of random requests through one
//! layer. Each task takes a global sequence number and calls the service under one lock,
//! so the sequence numbers are the order of `call()`; the bank records, for each
//! account, the sequence numbers of the requests it started. The program then checks:
//!
//! - money is conserved: the balances add up to the starting total plus the deposits;
//! - every account's requests ran in call order: for every account, the order the bank
//!   started them equals the order of their `call()`s.
//!
//! The same requests then go through the two versions people write by hand:
//!
//! - one global `tokio::sync::Mutex` around the whole bank: the books add up, but it
//!   runs one request at a time (and in the order in which their futures first poll the
//!   mutex, which nothing ties to the order of `call()`);
//! - a `tokio::sync::Mutex` per account, a transfer locking `from` and then `to`: two
//!   transfers between the same two accounts in opposite directions each take their
//!   first lock and wait for the other's forever. The run is bounded by a timeout, which
//!   is how the deadlock is detected.
//!
//! `Mode::sync_all` gives a transfer its place on both accounts' lines in one step,
//! inside `call()`, so every line agrees on one order and no requests can wait for each
//! other in a cycle.
//!
//! Run with `cargo run --example ledger`; it takes several seconds, most of them the
//! global lock's run and the deadlock's timeout. Flags: `--accounts N`,
//! `--transfers N`, `--deposits N`, `--reads N`, `--tasks N`, `--seed N`. It prints
//! each version's requests per second and checks, and exits with status 1 if a check
//! fails for the layer or the global lock.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinSet;
use tokio::time::Instant;
use tower::{BoxError, Layer, Service, ServiceExt, service_fn};
use tower_sync_engine::{Mode, SyncEngineLayer};

/// What to run.
#[derive(Clone, Copy, Debug)]
pub struct Config {
    /// Accounts, each opened with [`OPENING_BALANCE`]; at least 2.
    pub accounts: usize,
    /// Transfers between two different accounts, of 1 to 200 each.
    pub transfers: usize,
    /// Deposits of 1 to 100 each.
    pub deposits: usize,
    /// Balance reads.
    pub reads: usize,
    /// Tasks that send the requests, each awaiting one response before its next call.
    pub tasks: usize,
    /// Seeds the generator of the requests; every version gets the same ones.
    pub seed: u64,
    /// How long the per-account mutexes may run before they count as deadlocked.
    pub deadlock_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            accounts: 32,
            transfers: 2_000,
            deposits: 100,
            reads: 100,
            tasks: 64,
            seed: 0x2545_F491_4F6C_DD1D,
            deadlock_timeout: Duration::from_secs(2),
        }
    }
}

/// What every account holds when the bank opens.
pub const OPENING_BALANCE: u64 = 1_000;

/// How long the bank awaits between reading balances and writing them back.
const ROUND_TRIP: Duration = Duration::from_millis(1);

/// A request to the bank.
#[derive(Clone, Copy, Debug)]
enum Request {
    Deposit {
        account: usize,
        amount: u64,
    },
    /// Refused, and left out of both balances, when `from` holds less than `amount`.
    Transfer {
        from: usize,
        to: usize,
        amount: u64,
    },
    Balance {
        account: usize,
    },
}

impl Request {
    /// The accounts whose order the request takes part in: those it writes.
    fn ordered_on(&self) -> [Option<usize>; 2] {
        match *self {
            Request::Deposit { account, .. } => [Some(account), None],
            Request::Transfer { from, to, .. } => [Some(from), Some(to)],
            Request::Balance { .. } => [None, None],
        }
    }
}

/// A request with its place in the order of `call()`.
#[derive(Debug)]
struct Call {
    seq: u64,
    request: Request,
}

/// The layer's policy: a request is ordered on every account it writes.
fn by_accounts(call: &Call) -> Mode<usize> {
    match call.request {
        Request::Deposit { account, .. } => Mode::Sync(account),
        Request::Transfer { from, to, .. } => Mode::sync_all([from, to]),
        Request::Balance { .. } => Mode::Concurrent,
    }
}

/// The bank's books, behind a `std::sync::Mutex` held only to read or to write.
struct Books {
    balances: Vec<u64>,
    /// Per account, the sequence numbers of its deposits and transfers in the order the
    /// bank started them.
    started: Vec<Vec<u64>>,
}

type Bank = Arc<Mutex<Books>>;

fn open_bank(accounts: usize) -> Bank {
    Arc::new(Mutex::new(Books {
        balances: vec![OPENING_BALANCE; accounts],
        started: vec![Vec::new(); accounts],
    }))
}

/// Runs one request against the books, with a round trip between reading and writing.
/// Answers the balance read, or the `from` balance a transfer left.
async fn execute(bank: Bank, call: Call) -> Result<u64, BoxError> {
    let lock = || {
        bank.lock()
            .expect("the books' lock is never held across a panic")
    };
    match call.request {
        Request::Balance { account } => Ok(lock().balances[account]),
        Request::Deposit { account, amount } => {
            let balance = {
                let mut books = lock();
                books.started[account].push(call.seq);
                books.balances[account]
            };
            tokio::time::sleep(ROUND_TRIP).await;
            lock().balances[account] = balance + amount;
            Ok(balance + amount)
        }
        Request::Transfer { from, to, amount } => {
            let (from_balance, to_balance) = {
                let mut books = lock();
                books.started[from].push(call.seq);
                books.started[to].push(call.seq);
                (books.balances[from], books.balances[to])
            };
            tokio::time::sleep(ROUND_TRIP).await;
            if from_balance < amount {
                return Ok(from_balance);
            }
            let mut books = lock();
            books.balances[from] = from_balance - amount;
            books.balances[to] = to_balance + amount;
            Ok(from_balance - amount)
        }
    }
}

/// A small deterministic generator (xorshift64).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// The requests of a run, shuffled, and what their deposits add up to.
fn workload(config: &Config) -> (Vec<Request>, u64) {
    let mut rng = Rng(config.seed | 1);
    let accounts = config.accounts as u64;
    let mut requests = Vec::with_capacity(config.transfers + config.deposits + config.reads);
    let mut deposited = 0;
    for _ in 0..config.transfers {
        let from = rng.below(accounts);
        // Any account but `from`: a transfer to itself moves nothing.
        let to = (from + 1 + rng.below(accounts - 1)) % accounts;
        requests.push(Request::Transfer {
            from: from as usize,
            to: to as usize,
            amount: 1 + rng.below(200),
        });
    }
    for _ in 0..config.deposits {
        let amount = 1 + rng.below(100);
        deposited += amount;
        requests.push(Request::Deposit {
            account: rng.below(accounts) as usize,
            amount,
        });
    }
    for _ in 0..config.reads {
        requests.push(Request::Balance {
            account: rng.below(accounts) as usize,
        });
    }
    for i in (1..requests.len()).rev() {
        requests.swap(i, rng.below(i as u64 + 1) as usize);
    }
    (requests, deposited)
}

/// Sequence numbers in the order of `call()`, given out under one lock.
struct CallOrder {
    next: u64,
    /// Per account, the sequence numbers of its deposits and transfers.
    called: Vec<Vec<u64>>,
}

/// Sends `requests` through `service` from `config.tasks` tasks, counting the answered
/// ones in `answered`. Dropping the future aborts the tasks.
async fn drive<S>(
    service: S,
    requests: Vec<Request>,
    config: &Config,
    answered: Arc<AtomicUsize>,
) -> Result<Vec<Vec<u64>>, BoxError>
where
    S: Service<Call, Response = u64, Error = BoxError> + Clone + Send + 'static,
    S::Future: Send,
{
    let order = Arc::new(Mutex::new(CallOrder {
        next: 0,
        called: vec![Vec::new(); config.accounts],
    }));
    let mut shares = vec![Vec::new(); config.tasks];
    for (i, request) in requests.into_iter().enumerate() {
        shares[i % config.tasks].push(request);
    }
    let mut tasks = JoinSet::new();
    for share in shares {
        let mut service = service.clone();
        let order = order.clone();
        let answered = answered.clone();
        tasks.spawn(async move {
            for request in share {
                service.ready().await?;
                // The sequence number and the `call()` under one lock: the numbers are
                // the order in which the layer saw the requests.
                let response = {
                    let mut order = order.lock().expect("no panic under the order's lock");
                    let seq = order.next;
                    order.next += 1;
                    for &account in request.ordered_on().iter().flatten() {
                        order.called[account].push(seq);
                    }
                    service.call(Call { seq, request })
                };
                response.await?;
                answered.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<_, BoxError>(())
        });
    }
    while let Some(task) = tasks.join_next().await {
        task??;
    }
    let order = Arc::into_inner(order).expect("every task has ended");
    Ok(order
        .into_inner()
        .expect("no panic under the order's lock")
        .called)
}

/// One version's run that finished, and its checks.
#[derive(Debug)]
pub struct Finished {
    /// Requests sent, and answered.
    pub requests: usize,
    /// From the first `call()` to the last answer.
    pub elapsed: Duration,
    /// What the balances add up to at the end.
    pub total: u64,
    /// What they should add up to: the opening balances plus the deposits.
    pub expected_total: u64,
    /// Accounts whose requests the bank started in another order than their `call()`s.
    pub out_of_order: usize,
    /// Accounts in the bank.
    pub accounts: usize,
}

impl Finished {
    /// The balances add up to the opening balances plus the deposits.
    pub fn conserved(&self) -> bool {
        self.total == self.expected_total
    }

    /// Every account's requests started in the order of their `call()`s.
    pub fn in_call_order(&self) -> bool {
        self.out_of_order == 0
    }

    fn describe(&self) -> String {
        // A run of no requests takes no time.
        let rate = self.requests as f64 / self.elapsed.as_secs_f64().max(1e-6);
        let conserved = if self.conserved() {
            "conserved".to_owned()
        } else {
            format!(
                "NOT conserved (total {}, expected {})",
                self.total, self.expected_total
            )
        };
        let order = if self.in_call_order() {
            "in call order".to_owned()
        } else {
            format!(
                "out of call order on {} of {} accounts",
                self.out_of_order, self.accounts
            )
        };
        format!("{rate:.0} req/s, {conserved}, {order}")
    }
}

/// How one version's run ended.
#[derive(Debug)]
pub enum Outcome {
    /// Every request was answered.
    Finished(Finished),
    /// Still running when the timeout ran out, with `answered` of `requests` answered.
    Deadlocked {
        /// How long the run was given.
        timeout: Duration,
        /// Requests answered before it stopped.
        answered: usize,
        /// Requests sent.
        requests: usize,
    },
}

impl Outcome {
    /// Finished, with money conserved and every account in call order.
    pub fn is_correct(&self) -> bool {
        matches!(self, Outcome::Finished(run) if run.conserved() && run.in_call_order())
    }

    fn describe(&self) -> String {
        match self {
            Outcome::Finished(run) => run.describe(),
            Outcome::Deadlocked {
                timeout,
                answered,
                requests,
            } => format!(
                "deadlocked (timed out after {}, {answered} of {requests} requests answered)",
                seconds(*timeout)
            ),
        }
    }
}

fn seconds(duration: Duration) -> String {
    if duration.subsec_nanos() == 0 {
        format!("{} s", duration.as_secs())
    } else {
        format!("{} ms", duration.as_millis())
    }
}

/// The three versions' outcomes.
#[derive(Debug)]
pub struct Summary {
    /// `Mode::Sync` deposits and `Mode::sync_all` transfers through one layer.
    pub layer: Outcome,
    /// One `tokio::sync::Mutex` around the whole bank.
    pub global_lock: Outcome,
    /// A `tokio::sync::Mutex` per account, a transfer locking `from` and then `to`.
    pub per_account: Outcome,
}

impl Summary {
    /// The table the program prints.
    pub fn lines(&self) -> Vec<String> {
        [
            ("sync_all layer:", &self.layer),
            ("global lock:", &self.global_lock),
            ("per-account mutexes:", &self.per_account),
        ]
        .into_iter()
        .map(|(label, outcome)| format!("{label:<21} {}", outcome.describe()))
        .collect()
    }

    /// The layer's run is correct, and the global lock's conserved money. The global
    /// lock may run an account's requests out of call order (see `global_lock`), and the
    /// per-account mutexes may, on a lucky run, not deadlock.
    pub fn passed(&self) -> bool {
        self.layer.is_correct()
            && matches!(&self.global_lock, Outcome::Finished(run) if run.conserved())
    }
}

/// The bank behind the layer: each request ordered on the accounts it writes.
fn layered(
    bank: Bank,
) -> impl Service<Call, Response = u64, Error = BoxError, Future: Send> + Clone + Send + 'static {
    SyncEngineLayer::new(by_accounts).layer(service_fn(move |call| execute(bank.clone(), call)))
}

/// The bank behind one `tokio::sync::Mutex`: every request, reads too, one at a time.
///
/// The mutex queues a request when its response future is first polled, not in
/// `call()`, so two tasks that call at nearly the same moment can be served in the other
/// order.
fn global_lock(
    bank: Bank,
) -> impl Service<Call, Response = u64, Error = BoxError, Future: Send> + Clone + Send + 'static {
    let whole_bank = Arc::new(tokio::sync::Mutex::new(()));
    service_fn(move |call: Call| {
        let (bank, whole_bank) = (bank.clone(), whole_bank.clone());
        async move {
            let _whole_bank = whole_bank.lock().await;
            execute(bank, call).await
        }
    })
}

/// The bank behind a `tokio::sync::Mutex` per account, a transfer locking `from` and
/// then `to`.
fn per_account(
    bank: Bank,
    accounts: usize,
) -> impl Service<Call, Response = u64, Error = BoxError, Future: Send> + Clone + Send + 'static {
    let locks: Arc<Vec<tokio::sync::Mutex<()>>> =
        Arc::new((0..accounts).map(|_| tokio::sync::Mutex::new(())).collect());
    service_fn(move |call: Call| {
        let (bank, locks) = (bank.clone(), locks.clone());
        async move {
            match call.request {
                Request::Transfer { from, to, .. } => {
                    let _from = locks[from].lock().await;
                    // Whatever runs between the two locks (a read, a log line, here a
                    // yield) lets an opposite transfer take `to` first: each then holds
                    // the lock the other waits for.
                    tokio::task::yield_now().await;
                    let _to = locks[to].lock().await;
                    execute(bank, call).await
                }
                Request::Deposit { account, .. } | Request::Balance { account } => {
                    let _account = locks[account].lock().await;
                    execute(bank, call).await
                }
            }
        }
    })
}

/// Runs one version on a bank of its own, bounded by `timeout` if there is one, and
/// checks the books.
async fn check<S>(
    version: impl FnOnce(Bank) -> S,
    config: &Config,
    timeout: Option<Duration>,
) -> Result<Outcome, BoxError>
where
    S: Service<Call, Response = u64, Error = BoxError> + Clone + Send + 'static,
    S::Future: Send,
{
    let (requests, deposited) = workload(config);
    let count = requests.len();
    let bank = open_bank(config.accounts);
    let answered = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let run = drive(version(bank.clone()), requests, config, answered.clone());
    let called = match timeout {
        None => run.await?,
        Some(timeout) => match tokio::time::timeout(timeout, run).await {
            Ok(called) => called?,
            Err(_) => {
                return Ok(Outcome::Deadlocked {
                    timeout,
                    answered: answered.load(Ordering::Relaxed),
                    requests: count,
                });
            }
        },
    };
    let elapsed = started.elapsed();
    let books = bank
        .lock()
        .expect("the books' lock is never held across a panic");
    Ok(Outcome::Finished(Finished {
        requests: count,
        elapsed,
        total: books.balances.iter().sum(),
        expected_total: OPENING_BALANCE * config.accounts as u64 + deposited,
        out_of_order: called
            .iter()
            .zip(&books.started)
            .filter(|(called, started)| called != started)
            .count(),
        accounts: config.accounts,
    }))
}

/// Runs the same requests through the three versions; see the module docs.
pub async fn run(config: Config) -> Result<Summary, BoxError> {
    Ok(Summary {
        layer: check(layered, &config, None).await?,
        global_lock: check(global_lock, &config, None).await?,
        per_account: check(
            |bank| per_account(bank, config.accounts),
            &config,
            Some(config.deadlock_timeout),
        )
        .await?,
    })
}

fn parse_args() -> Result<Config, String> {
    let mut config = Config::default();
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let number = value
            .parse::<u64>()
            .map_err(|error| format!("{flag} {value}: {error}"))?;
        match flag.as_str() {
            "--accounts" if number >= 2 => config.accounts = number as usize,
            "--transfers" => config.transfers = number as usize,
            "--deposits" => config.deposits = number as usize,
            "--reads" => config.reads = number as usize,
            "--tasks" if number > 0 => config.tasks = number as usize,
            "--seed" => config.seed = number,
            _ => return Err(format!("unknown or invalid argument {flag} {value}")),
        }
    }
    Ok(config)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<(), BoxError> {
    let config = parse_args().unwrap_or_else(|message| {
        eprintln!(
            "{message}\nusage: ledger [--accounts N] [--transfers N] [--deposits N] \
             [--reads N] [--tasks N] [--seed N]"
        );
        std::process::exit(2);
    });
    println!(
        "ledger: {} accounts of {OPENING_BALANCE}; {} transfers, {} deposits and {} reads \
         from {} tasks, through each version",
        config.accounts, config.transfers, config.deposits, config.reads, config.tasks
    );
    let summary = run(config).await?;
    for line in summary.lines() {
        println!("{line}");
    }
    if !summary.passed() {
        return Err("the books do not add up, or an account ran out of call order".into());
    }
    Ok(())
}
