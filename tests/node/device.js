'use strict';
// The Node.js device SDK over MQTT (8883) as a registered device: send one message, read the twin, patch
// reported properties, read the twin again. Input: a JSON file (argv[2]) with {hub, deviceId, key, message,
// reported}. Prints {sent, twinBefore, twinAfter} as JSON. The emulator's CA comes from NODE_EXTRA_CA_CERTS.
const fs = require('fs');
const { Client, Message } = require('azure-iot-device');
const { Mqtt } = require('azure-iot-device-mqtt');

const input = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));

function props(twin) {
  return { desired: twin.properties.desired, reported: twin.properties.reported };
}

async function main() {
  const cs = `HostName=${input.hub};DeviceId=${input.deviceId};SharedAccessKey=${input.key}`;
  const client = Client.fromConnectionString(cs, Mqtt);
  try {
    await client.open();
    await client.sendEvent(new Message(input.message));
    const twin = await client.getTwin();
    const twinBefore = JSON.parse(JSON.stringify(props(twin)));
    await new Promise((resolve, reject) => twin.properties.reported.update(input.reported,
      (err) => (err ? reject(err) : resolve())));
    const again = await client.getTwin();
    const twinAfter = JSON.parse(JSON.stringify(props(again)));
    process.stdout.write(JSON.stringify({ sent: true, twinBefore, twinAfter }) + '\n');
  } finally {
    await client.close();
  }
}

main().then(() => process.exit(0), (err) => {
  process.stdout.write(JSON.stringify({ sent: false, error: err.name, message: String(err.message) }) + '\n');
  process.exit(1);
});
