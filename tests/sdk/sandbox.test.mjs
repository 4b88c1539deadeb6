// The sandbox proven with the real ConnectyCube JS SDK 6.1.2 in headless
// Chromium (and Firefox): two browser users sign in and call each other
// through it, and each hears the other's microphone tone.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { createServer } from 'node:http';
import { startSandbox, launchBrowser, signedInPage, waitFor, has, hears, sleep } from './harness.mjs';

let sandbox, browserA, browserB, alice, bob;

before(async () => {
  sandbox = await startSandbox();
  [browserA, browserB] = await Promise.all([launchBrowser(440), launchBrowser(660)]);
  alice = await signedInPage(browserA, sandbox, 'alice', 'pw-a', '?answerTimeout=5');
  bob = await signedInPage(browserB, sandbox, 'bob', 'pw-b');
});

after(async () => {
  await Promise.all([browserA?.close(), browserB?.close()]);
  await sandbox?.stop();
});

test('users are created by their first session and keep their password', async () => {
  assert.notEqual(alice.userId, bob.userId);
  const again = await signedInPage(browserA, sandbox, 'alice', 'pw-a');
  assert.equal(again.userId, alice.userId);
  await again.page.close();
  const wrong = await browserA.newPage();
  await wrong.goto(sandbox.url);
  await wrong.waitForFunction(() => window.demo !== undefined);
  const refused = await wrong.evaluate(() => window.demo.signIn('alice', 'not-her-password').then(() => null, (e) => e.code));
  assert.equal(refused, 401);
  await wrong.close();
});

test('an audio call connects and each side hears the other', async () => {
  await bob.page.evaluate(() => window.demo.setAutoAnswer(true));
  await alice.page.evaluate(() => window.demo.call('bob'));
  await waitFor('bob to see the call', () => has(bob, 'incoming call'));
  await waitFor('alice to see the accept', () => has(alice, 'accepted'));
  await hears(alice, 660);
  await hears(bob, 440);
  await alice.page.evaluate(() => window.demo.hangUp());
  await waitFor('bob to see the hang-up', () => has(bob, 'hung up'));
  await bob.page.evaluate(() => window.demo.setAutoAnswer(false));
});

test('a user in Firefox calls a user in Chromium, and each hears the other', async () => {
  const firefox = await launchBrowser(523, 'firefox');
  try {
    const carol = await signedInPage(firefox, sandbox, 'carol', 'pw-c');
    await bob.page.evaluate(() => window.demo.setAutoAnswer(true));
    await carol.page.evaluate(() => window.demo.call('bob'));
    await waitFor('carol to see the accept', () => has(carol, 'accepted'));
    await hears(carol, 660);
    await hears(bob, 523);
    await carol.page.evaluate(() => window.demo.hangUp());
    await waitFor('bob to see the hang-up', () => has(bob, 'hung up'));
  } finally {
    await bob.page.evaluate(() => window.demo.setAutoAnswer(false));
    await firefox.close();
  }
});

test('a rejected call reaches the caller with the reason', async () => {
  await sleep(500);
  await bob.page.evaluate(() => window.demo.rejectNextCall({ busy: true }));
  await alice.page.evaluate(() => window.demo.call('bob'));
  const rejected = await waitFor('alice to see the reject', () =>
    alice.page.evaluate(() => window.demo.events.filter((e) => e.kind === 'rejected').pop()));
  assert.match(rejected.detail, /"busy":"true"/);
});

test('the callee can hang up', async () => {
  await sleep(500);
  await bob.page.evaluate(() => window.demo.setAutoAnswer(true));
  const count = (peer, kind) => peer.page.evaluate((k) => window.demo.events.filter((e) => e.kind === k).length, kind);
  const before = await count(alice, 'hung up');
  const answered = await count(bob, 'answered');
  await alice.page.evaluate(() => window.demo.call('bob'));
  await waitFor('bob to answer', async () => (await count(bob, 'answered')) > answered);
  await hears(alice, 660);
  await bob.page.evaluate(() => window.demo.hangUp());
  await waitFor('alice to see the hang-up', async () => (await count(alice, 'hung up')) > before);
  await bob.page.evaluate(() => window.demo.setAutoAnswer(false));
});

test('an unanswered call times out at the caller', async () => {
  await sleep(500);
  await alice.page.evaluate(() => window.demo.call('bob'));
  await waitFor('alice to give up', () => has(alice, 'no answer'), 15000);
});

test("the SDK's push notifications reach a subscribed web device", async () => {
  // The device's push endpoint, where the sandbox delivers.
  const delivered = [];
  const endpoint = createServer((request, response) => {
    let body = '';
    request.on('data', (chunk) => { body += chunk; });
    request.on('end', () => { delivered.push(JSON.parse(body)); response.writeHead(201).end(); });
  });
  await new Promise((resolve) => endpoint.listen(0, '127.0.0.1', resolve));
  const webEndpoint = `http://127.0.0.1:${endpoint.address().port}/bob`;
  try {
    const subscribed = await bob.page.evaluate((web_endpoint) => ConnectyCube.pushnotifications.subscriptions.create({
      notification_channel: 'web',
      push_token: { environment: 'development', web_endpoint, web_auth: 'auth', web_p256dh: 'p256dh' },
      device: { platform: 'web', udid: 'bob-browser' },
    }), webEndpoint);
    assert.equal(subscribed[0].subscription.notification_channel.name, 'web');
    const payload = { message: 'Incoming audio call from alice', signal_type: 'startCall', session_id: 's-1', ios_voip: 1 };
    const sent = await alice.page.evaluate(([ids, payload]) => ConnectyCube.pushnotifications.events.create({
      notification_type: 'push',
      environment: 'development',
      user: { ids },
      message: ConnectyCube.pushnotifications.base64Encode(JSON.stringify(payload)),
    }), [String(bob.userId), payload]);
    assert.equal(sent[0].event.notification_channel.name, 'web');
    await waitFor('the push at bob\'s device', () => delivered.length > 0);
    assert.deepEqual(delivered[0], payload);
    // Nobody subscribed in production: ConnectyCube's refusal.
    const refused = await alice.page.evaluate((ids) => ConnectyCube.pushnotifications.events.create({
      notification_type: 'push',
      environment: 'production',
      user: { ids },
      message: ConnectyCube.pushnotifications.base64Encode('{}'),
    }).then(() => null, (e) => e.code), String(bob.userId));
    assert.equal(refused, 422);
  } finally {
    endpoint.close();
  }
});

test("a callee with no chat declines by REST and the caller sees the reject", async () => {
  await sleep(500);
  const count = (peer, kind) => peer.page.evaluate((k) => window.demo.events.filter((e) => e.kind === k).length, kind);
  const rejectedBefore = await count(alice, 'rejected');
  const ringingBefore = await count(bob, 'incoming call');
  await alice.page.evaluate(() => window.demo.call('bob'));
  await waitFor('bob to see the call', async () => (await count(bob, 'incoming call')) > ringingBefore);
  // As a closed app's call screen does: the SDK's callRejectRequest.
  const sessionID = await bob.page.evaluate(() => Object.keys(ConnectyCube.videochat.sessions).pop());
  await bob.page.evaluate(([sessionID, recipientId]) => ConnectyCube.videochat.callRejectRequest({
    sessionID, recipientId, platform: 'web', userInfo: { busy: 'true' },
  }), [sessionID, alice.userId]);
  const rejected = await waitFor('alice to see the reject', async () => {
    const all = await alice.page.evaluate(() => window.demo.events.filter((e) => e.kind === 'rejected'));
    return all.length > rejectedBefore ? all.pop() : null;
  });
  assert.match(rejected.detail, new RegExp(`by ${bob.userId} .*"busy":"true"`));
});
