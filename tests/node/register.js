'use strict';
// Registers devices with Microsoft's Node.js provisioning SDK, all at once, and prints one JSON array:
// [{name, ok, state} | {name, ok: false, error, message, errorCode}]. Input: a JSON file (argv[2]) with
// {host, idScope, registrations: [{name, transport: "mqtt"|"http", registrationId, key, payload}]}.
// The emulator's CA comes from NODE_EXTRA_CA_CERTS: the provisioning transports have no CA option.
const fs = require('fs');
const { ProvisioningDeviceClient } = require('azure-iot-provisioning-device');
const { SymmetricKeySecurityClient } = require('azure-iot-security-symmetric-key');
const transports = {
  mqtt: () => new (require('azure-iot-provisioning-device-mqtt').Mqtt)(),
  http: () => new (require('azure-iot-provisioning-device-http').Http)(),
};

const input = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));

function registerOne(r) {
  return new Promise((resolve) => {
    const security = new SymmetricKeySecurityClient(r.registrationId, r.key);
    const client = ProvisioningDeviceClient.create(input.host, input.idScope, transports[r.transport](), security);
    if (r.payload !== undefined) client.setProvisioningPayload(r.payload);
    client.register((err, result) => {
      // DPS's answer (an error body, or the operation with its registrationState): err.result over MQTT,
      // err.responseBody (text) over HTTP
      let answer = (err && err.result) || {};
      if (err && !err.result && typeof err.responseBody === 'string') {
        try { answer = JSON.parse(err.responseBody); } catch (e) { answer = {}; }
      }
      const errorCode = answer.registrationState ? answer.registrationState.errorCode : answer.errorCode;
      const done = err
        ? { name: r.name, ok: false, error: err.name, message: String(err.message), errorCode }
        : { name: r.name, ok: true, state: result };
      resolve(done);
    });
  });
}

Promise.all(input.registrations.map(registerOne)).then((results) => {
  process.stdout.write(JSON.stringify(results) + '\n');
  process.exit(0); // the MQTT transport may keep a socket open after a refusal
});
