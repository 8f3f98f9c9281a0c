//! Built-in MPI measurements (run with `cargo bench --bench mpi -- <command>`):
//! - `quality`: precision, recall and F1 of `matched` and of `matched` + `possible` on a labelled synthetic
//!   data set (households with siblings and twins, records carrying realistic errors, and people who are not
//!   in the index at all, half of them relatives of someone who is).
//! - `lookup`: demographic lookup latency against a large person index (default 1,000,000).
//!
//! Both use the real built-in MPI on a SQLite file in a temporary folder.

use chrono::NaiveDate;
use clap::{Parser, Subcommand};
use cpis::config::Settings;
use cpis::db::Db;
use cpis::mpi::builtin::{self, PersonRow};
use cpis::mpi::matcher::Record;
use cpis::mpi::synthetic::{Description, Generator, Person};
use cpis::mpi::{MatchStatus, Resolution, Thresholds};
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    Quality {
        #[arg(long, default_value_t = 10_000)]
        persons: usize,
        #[arg(long, default_value_t = 42)]
        seed: u64,
        #[arg(long, default_value_t = 0.80)]
        matched: f64,
        #[arg(long, default_value_t = 0.50)]
        possible: f64,
    },
    Lookup {
        #[arg(long, default_value_t = 1_000_000)]
        persons: usize,
        #[arg(long, default_value_t = 10_000)]
        lookups: usize,
        #[arg(long, default_value_t = 7)]
        seed: u64,
    },
}

const TODAY: (i32, u32, u32) = (2026, 11, 25);

fn today() -> NaiveDate {
    NaiveDate::from_ymd_opt(TODAY.0, TODAY.1, TODAY.2).unwrap()
}

fn open_db(dir: &tempfile::TempDir) -> Db {
    let settings =
        Settings::for_database(&format!("sqlite://{}", dir.path().join("mpi.db").display()));
    let db = Db::connect(&settings.database).expect("open database");
    db.migrate().expect("migrate");
    db
}

fn load(db: &Db, people: &[Person]) -> Duration {
    let now = chrono::Utc::now().naive_utc();
    let mut rows: Vec<PersonRow> = people.iter().map(|p| p.person_row(now)).collect();
    let started = Instant::now();
    for chunk in rows.chunks_mut(50_000) {
        db.write_blocking(|conn| {
            builtin::insert_persons(conn, chunk).map_err(cpis::db::DbError::from)
        })
        .expect("insert persons");
    }
    started.elapsed()
}

fn record(d: &Description) -> Record<'_> {
    Record {
        nhs_number: None,
        given_name: d.given_name.as_deref(),
        family_name: d.family_name.as_deref(),
        birth_date: d.birth_date,
        sex: d.sex,
        postcode: d.postcode.as_deref(),
    }
}

fn resolve(db: &Db, d: &Description, t: Thresholds) -> Resolution {
    let mut conn = db.get().expect("connection");
    let candidates = builtin::score_candidates(&mut conn, &record(d)).expect("lookup");
    Resolution::from_candidates(candidates, t)
}

#[derive(Default)]
struct Tally {
    true_queries: usize,
    false_queries: usize,
    matched_right: usize,
    matched_wrong: usize,
    possible_right: usize,
    possible_wrong: usize,
    missed_by_error: BTreeMap<&'static str, usize>,
}

fn f1(p: f64, r: f64) -> f64 {
    if p + r == 0.0 {
        0.0
    } else {
        2.0 * p * r / (p + r)
    }
}

fn quality(persons: usize, seed: u64, matched: f64, possible: f64) {
    let thresholds = Thresholds { matched, possible };
    let dir = tempfile::tempdir().unwrap();
    let db = open_db(&dir);
    let mut generator = Generator::new(seed, today());
    let index = generator.population(persons);
    load(&db, &index);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed + 1);

    let mut tally = Tally::default();
    // Everyone in the index, described with errors: each should be found.
    for p in &index {
        let d = generator.describe(p);
        let r = resolve(&db, &d, thresholds);
        tally.true_queries += 1;
        let right = r.nhs_number.as_deref() == Some(p.nhs_number.as_str());
        match r.status {
            MatchStatus::Matched if right => tally.matched_right += 1,
            MatchStatus::Matched => {
                tally.matched_wrong += 1;
                if std::env::var_os("MPI_EVAL_DEBUG").is_some() {
                    eprintln!(
                        "wrong match for an indexed person: {:?} {:?} -> {:?}",
                        p,
                        d,
                        r.candidates.first()
                    );
                }
            }
            MatchStatus::Possible if right => tally.possible_right += 1,
            MatchStatus::Possible => tally.possible_wrong += 1,
            MatchStatus::None => {}
        }
        if !(right && r.status != MatchStatus::None) {
            let key = if d.errors.is_empty() {
                "no_error"
            } else {
                d.errors[0]
            };
            *tally.missed_by_error.entry(key).or_default() += 1;
        }
    }
    // People who are not in the index, half of them a sibling or twin of someone who is: none should match.
    let outsiders = persons / 2;
    for i in 0..outsiders {
        let someone = if i % 2 == 0 {
            let kin = &index[rng.random_range(0..index.len())];
            generator.relative(kin)
        } else {
            generator.population(1).remove(0)
        };
        let d = generator.describe(&someone);
        let r = resolve(&db, &d, thresholds);
        tally.false_queries += 1;
        match r.status {
            MatchStatus::Matched => {
                tally.matched_wrong += 1;
                if std::env::var_os("MPI_EVAL_DEBUG").is_some() {
                    eprintln!(
                        "wrong match for an outsider: {:?} {:?} -> {:?}",
                        someone,
                        d,
                        r.candidates.first()
                    );
                }
            }
            MatchStatus::Possible => tally.possible_wrong += 1,
            MatchStatus::None => {}
        }
    }

    let t = &tally;
    let p_matched = t.matched_right as f64 / (t.matched_right + t.matched_wrong).max(1) as f64;
    let r_matched = t.matched_right as f64 / t.true_queries as f64;
    let found = t.matched_right + t.possible_right;
    let p_any = found as f64 / (found + t.matched_wrong + t.possible_wrong).max(1) as f64;
    let r_any = found as f64 / t.true_queries as f64;
    println!("MPI matching quality: {persons} persons in the index, seed {seed}, thresholds matched {matched} / possible {possible}");
    println!(
        "queries: {} of indexed persons (with errors), {} of persons not in the index",
        t.true_queries, t.false_queries
    );
    println!("| result | precision | recall | F1 |");
    println!("|---|---|---|---|");
    println!(
        "| matched | {p_matched:.4} | {r_matched:.4} | {:.4} |",
        f1(p_matched, r_matched)
    );
    println!(
        "| matched + possible | {p_any:.4} | {r_any:.4} | {:.4} |",
        f1(p_any, r_any)
    );
    println!(
        "counts: matched right {}, matched wrong {}, possible right {}, possible wrong {}",
        t.matched_right, t.matched_wrong, t.possible_right, t.possible_wrong
    );
    println!(
        "true queries not found, by first error: {:?}",
        t.missed_by_error
    );
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn lookup(persons: usize, lookups: usize, seed: u64) {
    let dir = tempfile::tempdir().unwrap();
    let db = open_db(&dir);
    let mut generator = Generator::new(seed, today());
    let started = Instant::now();
    let index = generator.population(persons);
    let generated = started.elapsed();
    let loaded = load(&db, &index);
    println!(
        "built-in MPI lookup: {persons} persons (generated in {:.1} s, inserted with keys in {:.1} s, {:.0} rows/s)",
        generated.as_secs_f64(),
        loaded.as_secs_f64(),
        persons as f64 / loaded.as_secs_f64()
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed + 1);
    let t = Thresholds {
        matched: 0.8,
        possible: 0.5,
    };
    let mut conn = db.get().unwrap();
    let mut demographic = Vec::with_capacity(lookups);
    let mut by_nhs = Vec::with_capacity(lookups);
    let mut candidates_seen = 0usize;
    for _ in 0..lookups {
        let p = &index[rng.random_range(0..index.len())];
        let d = generator.describe(p);
        let started = Instant::now();
        let c = builtin::score_candidates(&mut conn, &record(&d)).unwrap();
        let r = Resolution::from_candidates(c, t);
        demographic.push(started.elapsed());
        candidates_seen += r.candidates.len();
        let started = Instant::now();
        let found = PersonRow::find_by_nhs(&mut conn, &p.nhs_number).unwrap();
        by_nhs.push(started.elapsed());
        assert!(found.is_some());
    }
    for (name, mut times) in [("demographics", demographic), ("nhs_number", by_nhs)] {
        times.sort();
        let mean = times.iter().sum::<Duration>() / times.len() as u32;
        println!(
            "| {name} | {lookups} | {:.3} ms | {:.3} ms | {:.3} ms | {:.3} ms | {:.3} ms |",
            mean.as_secs_f64() * 1e3,
            percentile(&times, 0.5).as_secs_f64() * 1e3,
            percentile(&times, 0.9).as_secs_f64() * 1e3,
            percentile(&times, 0.99).as_secs_f64() * 1e3,
            times.last().unwrap().as_secs_f64() * 1e3
        );
    }
    println!("(columns: lookups, mean, p50, p90, p99, max; {:.1} reported candidates per demographic lookup)", candidates_seen as f64 / lookups as f64);
}

fn main() {
    // `cargo bench` appends `--bench`; it is not ours.
    let args = Args::parse_from(std::env::args().filter(|a| a != "--bench"));
    match args.command {
        Command::Quality {
            persons,
            seed,
            matched,
            possible,
        } => quality(persons, seed, matched, possible),
        Command::Lookup {
            persons,
            lookups,
            seed,
        } => lookup(persons, lookups, seed),
    }
}
