// connectycubesink / connectycubesrc in gst-launch-1.0 pipelines, against the
// real ConnectyCube SDK in headless Chromium through the sandbox: tones both
// ways, the pipeline as caller and as callee, reject, no answer, hang-up from
// either side, and video (VP8, H.264) reaching the browser.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync } from 'node:fs';
import { execFileSync } from 'node:child_process';
import { join } from 'node:path';
import {
  startSandbox, launchBrowser, signedInPage, waitFor, has, hears, sleep, launch, pipelineFile, analyze, scratchDir,
} from './harness.mjs';

let sandbox, browser, carol;
// gst-launch prints structures with escaped spaces.
const said = (gst) => gst.output().replace(/\\(.)/g, '$1');
const workdir = () => mkdtempSync(join(scratchDir, 'pipeline-'));
const count = (peer, kind) => peer.page.evaluate((k) => window.demo.events.filter((e) => e.kind === k).length, kind);
const credentials = () =>
  `app-id=1 auth-key=sandbox api-url="http://127.0.0.1:${sandbox.port}" chat-url="ws://localhost:${sandbox.port}/ws" chat-domain=localhost`;

before(async () => {
  sandbox = await startSandbox();
  browser = await launchBrowser(660);
  carol = await signedInPage(browser, sandbox, 'carol', 'c', '?answerTimeout=8');
});

after(async () => {
  await browser?.close();
  await sandbox?.stop();
});

for (const stack of ['webrtcbin', 'shared']) {
  // A gst-launch that never exits fails the test instead of holding CI.
  test(`a pipeline calls a browser user (webrtc-stack=${stack}): each hears the other, and the browser hangs up`, { timeout: 120_000 }, async () => {
    await carol.page.evaluate(() => window.demo.setAutoAnswer(true));
    const dir = workdir();
    const gst = launch(
      `audiotestsrc is-live=true freq=440 volume=0.5 ! audio/x-raw,rate=48000,channels=1 ! opusenc ! rtpopuspay
       ! connectycubesink session=a webrtc-stack=${stack} ${credentials()} login=gst-a password=x peer=carol
       connectycubesrc session=a webrtc-stack=${stack} ! rtpopusdepay ! opusdec ! audioconvert ! wavenc ! filesink location=heard.wav`.replace(/\n/g, ' '),
      dir,
    );
    await hears(carol, 440);
    await sleep(2000);
    const stopped = await count(carol, 'hanging up');
    await carol.page.evaluate(() => window.demo.hangUp());
    assert.equal(await count(carol, 'hanging up'), stopped + 1);
    assert.equal(await gst.exited, 0, gst.output());
    assert.match(said(gst), /connectycube-call-ended.*hung up by user/);
    assert.match(analyze(join(dir, 'heard.wav'), 660), /660 Hz/);
    await carol.page.evaluate(() => window.demo.setAutoAnswer(false));
  });
}

test('pipelines/cc-send-tone calls and hangs up when its tone ends', async () => {
  const alice = await signedInPage(browser, sandbox, 'alice', 'a');
  await alice.page.evaluate(() => window.demo.setAutoAnswer(true));
  const gst = launch(pipelineFile('cc-send-tone', sandbox), workdir());
  await hears(alice, 440);
  assert.equal(await gst.exited, 0, gst.output());
  await waitFor('alice to see the hang-up', () => has(alice, 'hung up'));
  await alice.page.close();
});

test('pipelines/cc-receive-to-file answers a browser call and records it', async () => {
  const dir = workdir();
  const gst = launch(pipelineFile('cc-receive-to-file', sandbox), dir);
  await sleep(1500); // the pipeline signs in (and so creates its user) first
  await carol.page.evaluate(() => window.demo.call('gst-ear'));
  await waitFor('the pipeline to answer', () => has(carol, 'accepted'));
  await sleep(3000);
  await carol.page.evaluate(() => window.demo.hangUp());
  assert.equal(await gst.exited, 0, gst.output());
  assert.match(analyze(join(dir, 'cc-received.wav'), 660), /660 Hz/);
});

test('a pipeline on webrtc-stack=shared answers a browser call: each hears the other', async () => {
  const dir = workdir();
  const gst = launch(
    `audiotestsrc is-live=true freq=440 volume=0.5 ! audio/x-raw,rate=48000,channels=1 ! opusenc ! rtpopuspay
     ! connectycubesink session=b webrtc-stack=shared ${credentials()} login=gst-shared password=x answer-timeout=60
     connectycubesrc session=b webrtc-stack=shared ! rtpopusdepay ! opusdec ! audioconvert ! wavenc ! filesink location=heard.wav`.replace(/\n/g, ' '),
    dir,
  );
  await sleep(1500); // the pipeline signs in (and so creates its user) first
  await carol.page.evaluate(() => window.demo.call('gst-shared'));
  await waitFor('the pipeline to answer', () => has(carol, 'accepted'));
  await hears(carol, 440);
  await sleep(2000);
  await carol.page.evaluate(() => window.demo.hangUp());
  assert.equal(await gst.exited, 0, gst.output());
  assert.match(analyze(join(dir, 'heard.wav'), 660), /660 Hz/);
});

test('a rejected call ends the pipeline with the reason', async () => {
  await carol.page.evaluate(() => window.demo.rejectNextCall({ busy: true }));
  const gst = launch(`audiotestsrc is-live=true ! opusenc ! rtpopuspay ! connectycubesink ${credentials()} login=gst-b password=x peer=carol`, workdir());
  assert.equal(await gst.exited, 0, gst.output());
  assert.match(said(gst), /connectycube-call-ended.*rejected by user \d+ \(busy=true\)/);
});

test('an unanswered call ends the pipeline after answer-timeout', async () => {
  const gst = launch(`audiotestsrc is-live=true ! opusenc ! rtpopuspay ! connectycubesink ${credentials()} login=gst-c password=x peer=carol answer-timeout=3`, workdir());
  assert.equal(await gst.exited, 0, gst.output());
  assert.match(said(gst), /no answer from user \d+ within 3 s/);
  await waitFor('carol to stop ringing', () => has(carol, 'session closed'));
});

test('wrong credentials fail with a clear error', async () => {
  const gst = launch(`audiotestsrc is-live=true ! opusenc ! rtpopuspay ! connectycubesink ${credentials()} login=carol password=not-hers peer=1`, workdir());
  assert.notEqual(await gst.exited, 0);
  assert.match(said(gst), /sign-in as "carol" failed.*401/);
});

for (const [codec, encoder] of [
  ['VP8', 'vp8enc deadline=1 cpu-used=8 keyframe-max-dist=30 ! rtpvp8pay'],
  // Chromium decodes openh264's constrained-baseline stream (x264's, as configured in pipelines/, it does not: see the README).
  ['H.264', 'openh264enc gop-size=30 ! h264parse ! video/x-h264,stream-format=byte-stream,alignment=au ! rtph264pay config-interval=-1'],
]) {
  test(`the browser decodes ${codec} video sent by the sink`, async () => {
    await carol.page.evaluate(() => window.demo.setAutoAnswer(true));
    const gst = launch(
      `videotestsrc is-live=true ! video/x-raw,width=320,height=240,framerate=15/1 ! ${encoder}
       ! connectycubesink ${credentials()} login=gst-video password=x peer=carol`.replace(/\n/g, ' '),
      workdir(),
    );
    const frames = await waitFor(`${codec} frames in the browser`, async () => {
      const n = await carol.page.evaluate(() => window.demo.framesDecoded());
      return n >= 20 && n;
    }, 25000);
    assert.ok(frames >= 20);
    await carol.page.evaluate(() => window.demo.hangUp());
    assert.equal(await gst.exited, 0, gst.output());
    await carol.page.evaluate(() => window.demo.setAutoAnswer(false));
  });
}

// Congestion control: the link narrows to 600 kbit/s (tc in the test's own
// network namespace; the SDK files run one at a time, so nothing else shares
// it), the browser's transport-cc reports reach rtpgccbwe, and the VP8
// encoder, configured for 2 Mbit/s, is turned down while frames keep coming.
test('congestion control turns the encoder down on a narrow link', async () => {
  const links = ['lo', 'media0', 'media1'];
  const narrow = (on) => {
    for (const dev of links) {
      const args = on
        ? ['qdisc', 'add', 'dev', dev, 'root', 'tbf', 'rate', '600kbit', 'burst', '30kb', 'latency', '300ms']
        : ['qdisc', 'del', 'dev', dev, 'root'];
      execFileSync('tc', args);
    }
  };
  await carol.page.evaluate(() => window.demo.setAutoAnswer(true));
  const gst = launch(
    `videotestsrc is-live=true pattern=zone-plate kx2=20 ky2=20 kt=1 ! video/x-raw,width=320,height=240,framerate=30/1
     ! vp8enc deadline=1 cpu-used=8 target-bitrate=2000000 keyframe-max-dist=60 ! rtpvp8pay
     ! connectycubesink ${credentials()} login=gst-cc password=x peer=carol`.replace(/\n/g, ' '),
    workdir(),
  );
  const encoderRates = () => [...said(gst).matchAll(/connectycube-bitrate.*?encoder=\(string\)vp8enc, encoder-bitrate=\(uint\)(\d+)/g)]
    .map((m) => Number(m[1]));
  try {
    await waitFor('video in the browser', async () => (await carol.page.evaluate(() => window.demo.framesDecoded())) >= 10, 25000);
    narrow(true);
    const lowered = await waitFor('the encoder turned below 800 kbit/s', async () => {
      const rates = encoderRates();
      return rates.length > 0 && rates[rates.length - 1] < 800000 && rates[rates.length - 1];
    }, 30000).catch((e) => { throw new Error(`${e.message}\nrates: ${encoderRates()}\n${execFileSync('tc', ['-s', 'qdisc']).toString()}\n${said(gst).slice(-1500)}`); });
    assert.ok(lowered >= 30000, `the encoder still runs (${lowered} bit/s)`);
    const before = await carol.page.evaluate(() => window.demo.framesDecoded());
    await sleep(6000);
    const after = await carol.page.evaluate(() => window.demo.framesDecoded());
    assert.ok(after - before >= 30, `frames kept coming on the narrow link: ${after - before} in 6 s; rates ${encoderRates()}`);
  } finally {
    narrow(false);
    await carol.page.evaluate(() => window.demo.hangUp());
    await carol.page.evaluate(() => window.demo.setAutoAnswer(false));
  }
  assert.equal(await gst.exited, 0, gst.output());
});
