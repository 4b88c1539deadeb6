// A ConnectyCube web user as a child process: headless Chromium (or Firefox)
// with the real SDK (the sandbox's demo page), driven by JSON lines on stdin
// and answering with one JSON line each on stdout; it closes its browser and
// exits when stdin closes. For tests written in Rust.
//
//   node browser-peer.mjs SANDBOX_URL LOGIN PASSWORD [TONE_HZ [chromium|firefox]]
//   → {"ready":true,"userId":1001}
//   ← {"op":"call","to":"bob","video":false,"userInfo":{}}   → {"ok":true,"value":...}
//   ops: call, answer, reject, rejectNext, autoAnswer, hangUp, events, frequency, framesDecoded, audioStats,
//        iceRestart, iceUfrags, remoteCandidates, localPorts, dtmf
import { createInterface } from 'node:readline';
import { launchBrowser, signedInPage } from './harness.mjs';

const [url, login, password, tone, engine] = process.argv.slice(2);
const sandbox = { url: url.endsWith('/') ? url : url + '/' };
const browser = await launchBrowser(tone ? Number(tone) : 0, engine);
const peer = await signedInPage(browser, sandbox, login, password, '?answerTimeout=10');
const reply = (value) => process.stdout.write(JSON.stringify(value) + '\n');
reply({ ready: true, userId: peer.userId });

const ops = {
  call: (c) => peer.page.evaluate(([to, video, info]) => window.demo.call(to, video, info), [c.to, !!c.video, c.userInfo || {}]),
  answer: () => peer.page.evaluate(() => window.demo.answer()),
  reject: (c) => peer.page.evaluate((info) => window.demo.reject(info), c.userInfo || {}),
  rejectNext: (c) => peer.page.evaluate((info) => window.demo.rejectNextCall(info), c.userInfo || { busy: true }),
  autoAnswer: (c) => peer.page.evaluate((on) => window.demo.setAutoAnswer(on), !!c.on),
  hangUp: () => peer.page.evaluate(() => window.demo.hangUp()),
  events: () => peer.page.evaluate(() => window.demo.events),
  frequency: () => peer.page.evaluate(() => window.demo.dominantFrequency()),
  framesDecoded: () => peer.page.evaluate(() => window.demo.framesDecoded()),
  audioStats: () => peer.page.evaluate(() => window.demo.audioStats()),
  iceRestart: () => peer.page.evaluate(() => window.demo.iceRestart()),
  iceUfrags: () => peer.page.evaluate(() => window.demo.iceUfrags()),
  remoteCandidates: () => peer.page.evaluate(() => window.demo.remoteCandidates()),
  localPorts: () => peer.page.evaluate(() => window.demo.localPorts()),
  dtmf: (c) => peer.page.evaluate((tones) => window.demo.sendDtmf(tones), c.tones),
};

for await (const line of createInterface({ input: process.stdin })) {
  let command;
  try {
    command = JSON.parse(line);
    const op = ops[command.op];
    if (!op) throw new Error(`unknown op ${command.op}`);
    reply({ ok: true, value: (await op(command)) ?? null });
  } catch (e) {
    reply({ ok: false, error: String(e && e.message || e) });
  }
}
await browser.close();
process.exit(0);
