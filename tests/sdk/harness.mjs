// Shared by the SDK tests: start the sandbox (the real sip-cc-bridge binary),
// start a headless browser (Chromium, or Firefox) with a fake microphone
// playing a known tone, open the sandbox's demo page (the real
// connectycube.min.js) and drive it.
import { spawn, execFileSync } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, rmSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';
import puppeteer from 'puppeteer-core';

export const root = join(dirname(fileURLToPath(import.meta.url)), '..', '..');
export const bridgeBinary = process.env.SIP_CC_BRIDGE || join(root, 'target', 'release', 'sip-cc-bridge');
const scratch = mkdtempSync(join(tmpdir(), 'sdk-tests-'));
process.on('exit', () => rmSync(scratch, { recursive: true, force: true }));

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Polls `probe` until it returns a truthy value, or fails after `ms`. */
export async function waitFor(what, probe, ms = 15000) {
  const deadline = Date.now() + ms;
  let last;
  while (Date.now() < deadline) {
    last = await probe();
    if (last) return last;
    await sleep(100);
  }
  throw new Error(`timed out waiting for ${what} (last: ${JSON.stringify(last)})`);
}

/** Runs `sip-cc-bridge sandbox` on a free loopback port; resolves once it listens. */
export async function startSandbox(port = 0) {
  const chosen = port || 18000 + Math.floor(Math.random() * 2000);
  const child = spawn(bridgeBinary, ['sandbox', '--listen', `127.0.0.1:${chosen}`], { stdio: ['ignore', 'pipe', 'pipe'] });
  let output = '';
  child.stdout.on('data', (d) => { output += d; });
  child.stderr.on('data', (d) => { output += d; });
  await waitFor('the sandbox to listen', () => output.includes('ConnectyCube sandbox on') || child.exitCode !== null, 10000);
  if (child.exitCode !== null) throw new Error(`sandbox exited: ${output}`);
  return {
    port: chosen,
    url: `http://localhost:${chosen}/`,
    output: () => output,
    async stop() {
      if (child.exitCode !== null) return;
      child.kill('SIGINT');
      await waitFor('the sandbox to stop', () => child.exitCode !== null, 5000).catch(() => child.kill('SIGKILL'));
    },
  };
}

/** A WAV file with a sine tone, for Chromium's fake microphone. */
export function toneFile(hz) {
  const file = join(scratch, `tone-${hz}.wav`);
  execFileSync('sox', ['-n', '-r', '48000', '-c', '1', '-b', '16', file, 'synth', '20', 'sine', String(hz), 'vol', '0.5']);
  return file;
}

/**
 * A headless browser whose microphone plays `hz`: Debian's Chromium (by
 * Playwright), or with `engine` 'firefox' Debian's Firefox ESR (by
 * Puppeteer, over WebDriver BiDi: Playwright drives only its own patched
 * Firefox). Both pages answer the same calls (`goto`, `evaluate`,
 * `waitForFunction`, `pageerror`).
 */
export async function launchBrowser(hz, engine = 'chromium') {
  if (engine === 'firefox') return launchFirefox(hz);
  const args = [
    '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
    '--disable-component-update', '--disable-sync', '--use-fake-device-for-media-stream', '--use-fake-ui-for-media-stream',
    '--disable-features=WebRtcHideLocalIpsWithMdns', '--autoplay-policy=no-user-gesture-required',
  ];
  if (hz) args.push(`--use-file-for-fake-audio-capture=${toneFile(hz)}`);
  return chromium.launch({ executablePath: process.env.CHROMIUM || '/usr/bin/chromium', headless: true, args });
}

/**
 * Firefox with its own fake microphone (a sine at `hz`, by its pref). Its
 * Web Audio runs only with an audio output, so it plays into a PulseAudio
 * null sink of this process's own. Host candidates stay hidden behind mDNS
 * names, as in every Firefox: the bridge meets the browser by the addresses
 * its checks come from.
 */
async function launchFirefox(hz) {
  const pulse = await nullAudioServer();
  return puppeteer.launch({
    browser: 'firefox',
    executablePath: process.env.FIREFOX || '/usr/bin/firefox-esr',
    headless: true,
    env: { ...process.env, PULSE_SERVER: pulse },
    extraPrefsFirefox: {
      'media.navigator.streams.fake': true,
      'media.navigator.permission.disabled': true,
      'media.navigator.audio.fake_frequency': hz || 1000,
      'media.autoplay.default': 0,
      'media.autoplay.block-webaudio': false,
      'media.peerconnection.ice.default_address_only': false,
    },
  });
}

let nullAudio;
/** A PulseAudio server with one null sink, for this process's browsers; stopped at exit. */
function nullAudioServer() {
  nullAudio ??= (async () => {
    const dir = join(scratch, 'pulse');
    mkdirSync(dir, { recursive: true });
    const socket = join(dir, 'native');
    const child = spawn('pulseaudio', [
      '--daemonize=no', '--exit-idle-time=30', '-n', '--use-pid-file=false', '--disable-shm',
      '-L', 'module-null-sink sink_name=null',
      '-L', `module-native-protocol-unix auth-anonymous=1 socket=${socket}`,
    ], { env: { ...process.env, XDG_RUNTIME_DIR: dir, HOME: dir }, stdio: 'ignore' });
    process.on('exit', () => child.kill());
    await waitFor('PulseAudio to listen', () => existsSync(socket) || child.exitCode !== null, 10000);
    if (child.exitCode !== null) throw new Error(`pulseaudio exited with ${child.exitCode}`);
    return `unix:${socket}`;
  })();
  return nullAudio;
}

/** Opens the sandbox's demo page and signs in; returns the page and its user id. */
export async function signedInPage(browser, sandbox, login, password = 'demo', query = '') {
  const page = await browser.newPage();
  page.on('pageerror', (e) => console.error(`[${login}] page error: ${e.message}`));
  await page.goto(sandbox.url + query);
  await page.waitForFunction(() => window.demo !== undefined);
  const userId = await page.evaluate(([l, p]) => window.demo.signIn(l, p), [login, password]);
  return { page, userId, login };
}

export const has = (peer, kind) => peer.page.evaluate((k) => window.demo.has(k), kind);
export const frequency = (peer) => peer.page.evaluate(() => window.demo.dominantFrequency());

/** Waits until the remote audio's dominant frequency is within 15 Hz of `hz`. */
export async function hears(peer, hz) {
  return waitFor(`${peer.login} to hear ${hz} Hz`, async () => Math.abs((await frequency(peer)) - hz) < 15, 20000);
}

/** Runs gst-launch-1.0 on a description (shell-quoted like a pipelines/ file) in `dir`. */
export function launch(description, dir) {
  const env = { ...process.env, GST_PLUGIN_PATH: process.env.GST_PLUGIN_PATH || join(root, 'target', 'gst-plugins') };
  const child = spawn('sh', ['-c', `exec gst-launch-1.0 -e -m ${description}`], { cwd: dir, env, stdio: ['ignore', 'pipe', 'pipe'] });
  let output = '';
  child.stdout.on('data', (d) => { output += d; });
  child.stderr.on('data', (d) => { output += d; });
  const exited = new Promise((resolve) => child.on('close', (code) => resolve(code)));
  return { output: () => output, exited, kill: () => child.kill('SIGINT') };
}

/** A pipelines/ file's description, pointed at this sandbox. */
export function pipelineFile(name, sandbox, replacements = {}) {
  let text = readFileSync(join(root, 'pipelines', `${name}.pipeline`), 'utf8')
    .split('\n').filter((l) => !l.trim().startsWith('#')).join(' ')
    .replaceAll(':8080', `:${sandbox.port}`);
  for (const [from, to] of Object.entries(replacements)) text = text.replaceAll(from, to);
  return text;
}

/** The dominant frequency of a WAV file, by `sip-cc-bridge analyze`. */
export function analyze(file, expectHz) {
  return execFileSync(bridgeBinary, ['analyze', '--expect', String(expectHz), file], { encoding: 'utf8' });
}

export const scratchDir = scratch;
