//! Micro-benchmarks of the per-request work: index lookup, token checks, route matching,
//! policy, and the credential response.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, SystemTime};

use criterion::{Criterion, criterion_group, criterion_main};
use iamlet::cluster::PodIndex;
use iamlet::credentials::{Credentials, Issued};
use iamlet::imds::TokenIssuer;
use iamlet::imds::render;
use iamlet::imds::routes::classify;
use iamlet::pod::PodIdentity;
use iamlet::policy::{BaseArn, Policy};
use iamlet::resolve::Resolver;

fn ip(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, (i / 65536) as u8, (i / 256 % 256) as u8, (i % 256) as u8))
}

fn pod(i: usize) -> PodIdentity {
    PodIdentity {
        namespace: "shop".into(),
        name: format!("web-{i}"),
        uid: format!("uid-{i}"),
        ips: vec![ip(i)],
        role_annotation: Some("app".into()),
        running: true,
        ..PodIdentity::default()
    }
}

fn hot_path(c: &mut Criterion) {
    let mut index = PodIndex::default();
    for i in 0..5_000 {
        index.upsert(pod(i));
    }
    let target = ip(4_321);
    c.bench_function("index lookup (5,000 pods)", |b| b.iter(|| black_box(index.lookup(black_box(&target)))));

    let tokens = TokenIssuer::new();
    let now = SystemTime::now();
    let token = tokens.issue(target, Duration::from_secs(21600), now);
    c.bench_function("IMDSv2 token verify", |b| b.iter(|| tokens.verify(black_box(&token), target, now)));

    let allow = iamlet::imds::routes::AllowList::default();
    c.bench_function("route: credentials path", |b| {
        b.iter(|| black_box(classify(black_box("/latest/meta-data/iam/security-credentials/app"), &allow)))
    });

    let policy = Policy {
        base: Some(BaseArn::parse("arn:aws:iam::123456789012:role/").unwrap()),
        default_role: None,
        restrictions: None,
        account: None,
    };
    let resolver = Resolver::new(std::sync::Arc::new(policy));
    let identity = pod(1);
    c.bench_function("resolve (bare role name, credential key included)", |b| {
        b.iter(|| black_box(resolver.resolve(black_box(&identity))))
    });

    let issued = Issued::new(
        Credentials {
            access_key_id: "ASIAEXAMPLEEXAMPLE12".into(),
            secret_access_key: "s".repeat(40),
            session_token: "t".repeat(700),
            expiration: now + Duration::from_secs(3600),
        },
        now,
    );
    c.bench_function("credential document: render", |b| b.iter(|| black_box(render::credentials(black_box(&issued)))));
    c.bench_function("credential document: cached bytes", |b| {
        b.iter(|| black_box(issued.rendered(render::credentials)))
    });
}

criterion_group!(benches, hot_path);
criterion_main!(benches);
