//! The SIP leg with real phones and a real SIP server: the bridge registers
//! its `echo` and `tone` accounts at Kamailio (digest), baresip registers as
//! carol and calls them through Kamailio; what baresip hears is checked.

mod support;

use std::time::Duration;

use support::{Baresip, BridgeProcess, Dnsmasq, KamailioProcess, sipp_server, wav_frequency};

#[test]
fn baresip_hears_the_echo_and_the_tone_through_kamailio() {
    let kamailio = KamailioProcess::start();
    let registrar = format!("127.0.0.1:{}", kamailio.port);
    let management_port = support::free_port();
    let mut bridge = BridgeProcess::start(&[
        "--register",
        &format!("echo:echopw@{registrar}"),
        "--register",
        &format!("tone:wrong-password@{registrar}"),
        "--management",
        &format!("127.0.0.1:{management_port}"),
    ]);
    assert_echo_registers(&bridge, &kamailio, "echo registers");
    let failed = bridge
        .wait_for_log(
            |l| l.contains("registration tone@") && l.contains("failed: "),
            Duration::from_secs(10),
        )
        .unwrap_or_else(|| panic!("a refused account is reported: {:#?}", bridge.logs()));
    assert!(failed.contains("401") || failed.contains("403"), "{failed}");
    // Both states are in the management API's stats too.
    let (_, body) = support::http_get(management_port, "/stats", Some(support::MANAGEMENT_TOKEN));
    let stats: serde_json::Value = serde_json::from_str(&body).unwrap();
    let registrations = stats["registrations"].as_object().unwrap();
    let state = |user: &str| {
        registrations
            .iter()
            .find(|(name, _)| name.starts_with(&format!("{user}@")))
            .and_then(|(_, state)| state.as_str())
            .unwrap_or_default()
            .to_owned()
    };
    assert_eq!(state("echo"), "registered", "{stats:#}");
    assert!(state("tone").starts_with("failed: "), "{stats:#}");
    assert!(
        bridge
            .logs()
            .iter()
            .all(|l| !l.contains("echopw") && !l.contains("wrong-password"))
    );

    // Five phones at once, one codec each, two of them insisting on
    // SDES-SRTP (one in the RTCP feedback profile, RTP/SAVPF), all calling
    // the echo.
    let phones = [
        ("g711", 523, None),
        ("g722", 660, None),
        ("opus", 880, None),
        ("g711", 740, Some("srtp-mand")),
        ("g711", 587, Some("srtp-mandf")),
    ];
    let calls: Vec<_> = phones
        .iter()
        .map(|&(codec, frequency, srtp)| {
            let port = kamailio.port;
            std::thread::spawn(move || {
                let mut phone = Baresip::new("carol", "carolpw", port, frequency, codec);
                if let Some(mediaenc) = srtp {
                    phone = phone.with_mandatory_srtp(mediaenc);
                }
                let output = phone.call("echo", 6);
                let heard = phone.heard().and_then(|wav| wav_frequency(&wav));
                (codec, frequency, heard, output)
            })
        })
        .collect();
    for call in calls {
        let (codec, frequency, heard, output) = call.join().unwrap();
        let heard = heard.unwrap_or_else(|| {
            panic!(
                "{codec}: baresip heard nothing\n{output}\n{:#?}",
                bridge.logs()
            )
        });
        assert!(
            (heard - f64::from(frequency)).abs() < f64::from(frequency) * 0.03,
            "{codec}: sent {frequency} Hz, heard {heard:.0} Hz"
        );
    }
    for media in [
        "PCMU SendRecv,",
        "G722 SendRecv,",
        "OPUS SendRecv,",
        "PCMU SendRecv SRTP AES_CM_128_HMAC_SHA1_80,",
    ] {
        assert!(
            bridge.logged(&format!(": {media}")),
            "a {media} call: {:#?}",
            bridge.logs()
        );
    }

    // Stopping the bridge takes its binding away: the echo is no longer found.
    assert!(bridge.interrupt(), "the bridge exits cleanly on Ctrl-C");
    assert!(
        bridge
            .logs()
            .iter()
            .any(|l| echo_registration_is(l, "unregistered"))
    );
    let phone = Baresip::new("carol", "carolpw", kamailio.port, 440, "g711");
    let output = phone.call("echo", 3);
    assert!(
        output.contains("404"),
        "Kamailio no longer routes to the bridge:\n{output}"
    );
}

#[test]
fn the_bridge_registers_under_a_sha256_digest_challenge() {
    let kamailio = KamailioProcess::start_with_digest("SHA-256");
    let mut bridge = BridgeProcess::start(&[
        "--register",
        &format!("echo:echopw@127.0.0.1:{}", kamailio.port),
    ]);
    assert_echo_registers(&bridge, &kamailio, "echo registers answering SHA-256");
    assert!(bridge.interrupt(), "the bridge exits cleanly on Ctrl-C");
    assert!(
        bridge
            .logs()
            .iter()
            .any(|l| echo_registration_is(l, "unregistered")),
        "the un-REGISTER is accepted too: {:#?}",
        bridge.logs()
    );
}

/// A registrar whose domain resolves nowhere, reached through the outbound
/// proxy (`sip.outbound_proxy`), as providers' SBCs are: the REGISTER goes
/// to the proxy (here Kamailio itself) and the account registers.
#[test]
fn the_bridge_registers_through_its_outbound_proxy() {
    let kamailio = KamailioProcess::start();
    let config = support::tempdir().join("bridge.toml");
    let sandbox_port = support::free_port();
    std::fs::write(
        &config,
        format!(
            "[sip]\noutbound_proxy = \"127.0.0.1:{}\"\n\n\
             [connectycube]\nsandbox = true\napi_url = \"http://127.0.0.1:{sandbox_port}\"\n\
             chat_url = \"ws://127.0.0.1:{sandbox_port}/ws\"\n",
            kamailio.port
        ),
    )
    .unwrap();
    let bridge = BridgeProcess::start(&[
        "--config",
        config.to_str().unwrap(),
        "--register",
        "echo:echopw@pbx.sipcc.invalid",
    ]);
    assert_echo_registers(&bridge, &kamailio, "echo registers through the proxy");
}

/// A registrar named by its domain alone, as SIP trunks are: found by its
/// DNS SRV records (from a real DNS server); its first server is out of
/// service (503, here SIPp), so the account registers at the next
/// (Kamailio). Before, the first server found was the only one tried, and
/// the trunk's calls were lost while it was down.
#[test]
fn the_bridge_registers_at_the_next_server_when_the_first_is_down() {
    let kamailio = KamailioProcess::start();
    let unavailable_port = support::free_even_port();
    let unavailable = sipp_server(unavailable_port, "unavailable-registrar.xml", &[]);
    let srv = |port: u16, priority: u16| {
        format!("--srv-host=_sip._udp.trunk.sipcc.test,sbc.sipcc.test,{port},{priority},50")
    };
    let dns = Dnsmasq::start(&[
        srv(unavailable_port, 10),
        srv(kamailio.port, 20),
        "--host-record=sbc.sipcc.test,127.0.0.1".into(),
    ]);
    let bridge =
        BridgeProcess::start_resolving_with(&dns, &["--register", "echo:echopw@trunk.sipcc.test"]);
    assert_echo_registers(&bridge, &kamailio, "echo registers at the second server");
    let (success, output) = unavailable.join().unwrap();
    assert!(
        success,
        "the first server got the REGISTER first and answered 503: {output}"
    );
}

/// The bridge registers its account echo at Kamailio within 10 s; `what`
/// says how, in the failure with both logs.
fn assert_echo_registers(bridge: &BridgeProcess, kamailio: &KamailioProcess, what: &str) {
    assert!(
        bridge
            .wait_for_log(
                |l| echo_registration_is(l, "registered"),
                Duration::from_secs(10)
            )
            .is_some(),
        "{what}: {:#?}\n{}",
        bridge.logs(),
        kamailio.log()
    );
}

/// `line` of the bridge's log reports its account echo's registration in
/// `state`.
fn echo_registration_is(line: &str, state: &str) -> bool {
    line.contains("registration echo@") && line.ends_with(&format!(": {state}"))
}
