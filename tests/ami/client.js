// The real AMI client most Node.js tools use (npm `asterisk-manager`)
// against the tests' AMI double: node client.js PORT USERNAME SECRET
// prints one JSON line of what each action got.
'use strict';
const Manager = require('asterisk-manager');

const [port, username, secret] = process.argv.slice(2);

// Connects and logs in with events on; resolves with the login's error, if
// any, and the events received from the start.
function session(user, password) {
  const ami = Manager();
  Object.assign(ami.options, { port, host: '127.0.0.1', username: user, password, events: true });
  const events = [];
  ami.on('managerevent', (event) => events.push(event));
  return new Promise((resolve) =>
    ami.connect(port, '127.0.0.1', () => ami.login((err) => resolve({ ami, err, events }))));
}

const action = (ami, request) =>
  new Promise((resolve) => ami.action(request, (err, response) => resolve(err || response)));

(async () => {
  const out = {};
  out.wrongSecret = (await session(username, 'not-the-secret')).err;
  const { ami, err, events } = await session(username, secret);
  out.login = err || 'accepted';
  out.ping = await action(ami, { action: 'Ping' });
  out.setvar = await action(ami, { action: 'Setvar', variable: 'DEVICE_STATE(Custom:alice)', value: 'INUSE' });
  out.getvar = await action(ami, { action: 'Getvar', variable: 'DEVICE_STATE(Custom:alice)' });
  out.notCustom = await action(ami, { action: 'Setvar', variable: 'DEVICE_STATE(PJSIP/100)', value: 'INUSE' });
  out.unknown = await action(ami, { action: 'NoSuchAction' });
  // Events come on their own; give them a moment.
  await new Promise((resolve) => setTimeout(resolve, 300));
  out.events = events;
  out.logoff = await action(ami, { action: 'Logoff' });
  console.log(JSON.stringify(out));
  process.exit(0);
})().catch((e) => {
  console.error(e);
  process.exit(1);
});
